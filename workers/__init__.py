"""The Celery app: ``celery -A workers worker -Q resets`` (and beat, flower).

Configuration, queues, routing and the beat schedule live in
:mod:`workers.config`; task code lives in ``tasks/``.
"""

from workers.app import app

__all__ = ["app"]
