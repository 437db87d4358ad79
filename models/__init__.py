"""Schema, engine/session, migrations and the training domain functions.

Depends on nothing else of this project.
"""
