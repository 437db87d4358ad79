"""Celery entry points (thin) and the plain functions they call, one module per task family.

Depends on ``models`` only. Tasks are bound to whichever Celery app is current
(``workers.app``), via ``shared_task``.
"""
