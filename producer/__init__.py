"""The thin producer: validation, two-step confirmation, the job ledger, enqueue after commit.

Front ends: the Python API (``producer.resets``), the CLI (``producer.cli``) and
the HTTP API (``producer.http``). All of them call the same service functions.

The producer depends on ``models`` and on the Celery app (``workers.app``), never on
``tasks``: it publishes by task name (:mod:`models.messaging`) through that app, which
registers itself as the publisher when imported here.
"""

from workers.app import app

__all__ = ["app"]
