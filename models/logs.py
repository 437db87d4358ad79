"""Structured logs: an event name plus ids, one JSON object per line.

Never log learner names or e-mails: ids only. A line written inside a traced operation also
carries ``trace_id`` and ``span_id`` (nothing is looked up while tracing is off).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

from models.settings import get_settings
from models.tracing import log_fields

logger = logging.getLogger("progress_reset")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "event": getattr(record, "event", record.getMessage()),
        }
        payload.update(getattr(record, "fields", {}))
        payload.update(log_fields())
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info).splitlines()[-1]
        return json.dumps(payload, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{k}={v}" for k, v in (getattr(record, "fields", {}) | log_fields()).items())
        return f"{record.levelname.lower():7} {getattr(record, 'event', record.getMessage())} {fields}".rstrip()


def configure_logging(level: int = logging.INFO, stream=None) -> None:
    """Send the project's logs to ``stream`` (stderr) in the configured format; idempotent."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if get_settings().log_format == "json" else TextFormatter())
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False


def log_event(event: str, level: int = logging.INFO, exc_info: bool = False, **fields: object) -> None:
    """Log ``event`` (e.g. ``"reset.batch.done"``) with id fields."""
    logger.log(level, event, extra={"event": event, "fields": fields}, exc_info=exc_info)
