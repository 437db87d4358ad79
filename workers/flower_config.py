"""Flower configuration: ``celery -A workers flower --conf=workers/flower_config.py``.

Flower executes this file and reads the module-level names that match its
options; command-line flags given after ``--conf`` still win (compose passes
``--address=0.0.0.0`` inside the container, where the port is published only
to the host's loopback).

- **Basic auth** from ``FLOWER_USER`` / ``FLOWER_PASSWORD`` (through the
  settings object, like every other setting). Without them every page and
  the HTTP API answer 401 to everyone (Flower runs locked on loopback), and
  Flower refuses to start on a non-loopback address, so an unauthenticated
  dashboard is never exposed.
- **Bound to 127.0.0.1** by default.
- **Bounded memory**: Flower keeps the last ``max_tasks`` task events in
  memory (a million-learner reset is ~500 batch tasks plus notification
  chunks, so 20 000 covers several big resets) and forgets workers offline for
  an hour. No persistent state file: the ledger tables are the record of
  every job, so Flower's view is disposable and restarts clean.
- **Broker page**: on Redis, Flower counts each queue's messages itself: the
  URL keeps its ``redis://`` scheme, which is how Flower picks its queue
  reader, because the hardened transport is registered under that scheme
  (``workers/broker.py``). On RabbitMQ (``amqp://``) Flower reads the
  management HTTP API: ``RABBITMQ_MANAGEMENT_URL``, or by default
  ``http://<broker host>:15672/api/`` with the broker's user and password
  (Flower's own guess would use the AMQP port), passed as ``broker_api``.

Task arguments are ids only (job UUIDs, batch numbers, canary nonces), so the
task list shows no names or e-mails.
"""

import secrets as _secrets
from urllib.parse import urlsplit as _urlsplit

from tornado.options import options as _cli

from models.settings import SettingsError as _SettingsError
from models.settings import get_settings as _get_settings
from workers.app import app as _app

try:
    _settings = _get_settings()
except _SettingsError as _exc:
    raise SystemExit(f"error: configuration: {_exc}") from None
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}
_AMQP_SCHEMES = ("amqp", "pyamqp")


def _default(name: str, ours):
    """Our default where Flower would use its own; a FLOWER_* variable or a flag still wins."""
    current = getattr(_cli, name)
    flower_default = _cli._options[name.replace("_", "-")].default  # tornado keys options by dashed name
    return ours if current == flower_default else current


address = _cli.address or "127.0.0.1"
max_tasks = _default("max_tasks", 20_000)
max_workers = _default("max_workers", 200)
purge_offline_workers = _default("purge_offline_workers", 3600)
inspect_timeout = _default("inspect_timeout", 2000.0)
tasks_columns = _default("tasks_columns", "name,uuid,state,args,received,started,runtime,worker,retries")


def _management_api(settings) -> str | None:
    """RabbitMQ's management HTTP API for the Broker page, or None when the broker is not RabbitMQ."""
    broker = _urlsplit(settings.broker_url.split(";")[0].strip())
    if broker.scheme not in _AMQP_SCHEMES:
        return None
    if settings.rabbitmq_management_url:
        return settings.rabbitmq_management_url
    host = broker.hostname or "localhost"
    return f"http://{f'[{host}]' if ':' in host else host}:15672/api/"


broker_api = _default("broker_api", _management_api(_settings))

# Flower inspects the workers with eight broadcasts at once from a thread pool;
# with the workers' small broker connection pool (broker_pool_limit) they wait
# on one another until every call times out and /api/workers stays empty. The
# Flower process gets a pool big enough for them; the workers keep theirs.
_FLOWER_POOL_LIMIT = 16
if _app.conf.broker_pool_limit is not None and _app.conf.broker_pool_limit < _FLOWER_POOL_LIMIT:
    _app.conf.broker_pool_limit = _FLOWER_POOL_LIMIT
    _app._pool = None  # built lazily; make sure the next one has the new limit

if _settings.flower_user and _settings.flower_password:
    basic_auth = [f"{_settings.flower_user}:{_settings.flower_password}"]
elif not _cli.basic_auth and not _cli.auth:  # FLOWER_BASIC_AUTH / --basic_auth / OAuth --auth also count
    if address not in _LOOPBACK:
        raise SystemExit(
            f"flower: refusing to listen on {address} without authentication; set FLOWER_USER and FLOWER_PASSWORD"
        )
    # On loopback without credentials Flower would serve its pages (workers with the broker
    # URL, tasks) to anyone on the host; only its /api/* asked for a login. A credential
    # nobody knows makes every page answer 401 until FLOWER_USER/FLOWER_PASSWORD are set.
    # /healthcheck and /metrics stay open: Flower serves them without authentication.
    basic_auth = [f"locked-{_secrets.token_hex(16)}:{_secrets.token_urlsafe(32)}"]
