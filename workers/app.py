"""Build the Celery app from the settings in a couple of lines."""

from __future__ import annotations

from celery import Celery
from celery.signals import after_setup_logger, worker_process_init

from models.db import dispose_engine
from models.logs import configure_logging
from models.settings import get_settings
from workers.config import TASK_MODULES, celery_config

app = Celery("progress_reset", include=list(TASK_MODULES))
app.config_from_object(celery_config(get_settings()))
app.set_default()


@worker_process_init.connect
def _fresh_engine_in_child(**_kwargs) -> None:
    # Never share pooled connections across a fork: each pool child builds its own.
    dispose_engine()


@after_setup_logger.connect
def _project_logs(**_kwargs) -> None:
    # Project events (reset.batch.done, ...) as one JSON object per line on stderr, ids only.
    configure_logging()
