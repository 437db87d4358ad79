"""The Redis broker transport, hardened against messages that cannot be decoded.

kombu's Redis channel decodes every message it pops (``BRPOP``/``RPOP``) as
JSON and builds a ``Message`` from its envelope (``properties.delivery_tag``,
``properties.delivery_info``, the encoded body) inside the worker's event
loop. Anything else on a queue list -- ``LPUSH resets 'this is not json'``, an
envelope without a delivery tag, a body that does not decode -- raises there,
and Celery treats that as unrecoverable: the worker exits, and a restarted one
dies again on the next such message.

:class:`Channel` checks each popped message first. One that cannot be decoded
(or whose body is not the JSON every message of this system carries) is
moved aside, untouched, to the Redis list ``<queue>.malformed`` (newest
first, the last :data:`KEEP_PER_QUEUE` kept for inspection), counted in the
hash ``progress_reset.malformed_total`` (field: the queue) that ``/metrics`` reads, and logged
as ``broker.message.malformed`` (queue, reason, size; never the content); the
worker goes on serving. Well-formed messages take kombu's own path unchanged.

:func:`register` makes it the transport kombu picks for ``redis://`` and
``rediss://`` URLs (kombu's documented alias table), so the URL keeps its
scheme wherever it is shown or read back: the worker banner, ``celery
inspect``, and Flower, whose Broker page picks its queue reader from that
scheme (decision record 0006).
"""

from __future__ import annotations

import logging

from kombu.transport import TRANSPORT_ALIASES, get_transport_cls
from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

from models.logs import log_event
from models.queues import MALFORMED_COUNTS_KEY, malformed_key

TRANSPORT = "workers.broker:Transport"
KEEP_PER_QUEUE = 1000
SCHEMES = ("redis", "rediss")


def register() -> None:
    """Make :class:`Transport` the one kombu picks for ``redis://`` and ``rediss://`` URLs in this process.

    Safe to call twice. Must run before the first connection to Redis (``workers.app`` calls it
    on import); it fails loudly if kombu had already resolved one of these schemes to its own class.
    """
    for scheme in SCHEMES:
        TRANSPORT_ALIASES[scheme] = TRANSPORT
        if get_transport_cls(scheme) is not Transport:  # kombu caches a scheme's class once resolved
            raise RuntimeError(f"{scheme}:// was resolved before workers.broker.register() ran; "
                               "import workers.app before connecting to Redis")


class Channel(kombu_redis.Channel):
    """kombu's Redis channel; a message that cannot be decoded is set aside instead of raised."""

    def envelope_problem(self, payload) -> str | None:
        """Why ``payload`` (decoded JSON) is not a message this channel can deliver, or None if it is."""
        if not isinstance(payload, dict):
            return f"the message is a JSON {type(payload).__name__}, not an object"
        properties = payload.get("properties")
        if not isinstance(properties, dict):
            return "the message has no properties object"
        tag = properties.get("delivery_tag")
        if not isinstance(tag, str) or not tag:
            return "the message has no delivery_tag"
        info = properties.get("delivery_info")
        if not isinstance(info, dict) or not all(isinstance(info.get(k), str) for k in ("exchange", "routing_key")):
            return "the message has no delivery_info with exchange and routing_key"
        if not isinstance(payload.get("headers", {}), dict):
            return "the message headers are not an object"
        try:
            message = self.Message(payload, channel=self)  # decodes the body's transfer encoding
        except Exception as exc:  # noqa: BLE001 - any failure here would have stopped the worker
            return f"the message cannot be decoded ({type(exc).__name__})"
        content_type = message.content_type or ""
        if content_type != "application/json":
            # Every message of this system is JSON (task_serializer, accept_content); anything
            # else would be refused by the worker and dropped. Never deserialised here (pickle).
            return f"the message's content type {content_type[:64]!r} is not application/json"
        try:
            loads(bytes_to_str(message.body))
        except (TypeError, ValueError, UnicodeDecodeError) as exc:
            return f"the message body is not JSON ({type(exc).__name__})"
        return None

    def decode_or_set_aside(self, queue: str, item: bytes):
        """The decoded message, or None after moving ``item`` to ``<queue>.malformed``."""
        try:
            payload = loads(bytes_to_str(item))
        except (TypeError, ValueError, UnicodeDecodeError) as exc:
            reason = f"the message is not JSON ({type(exc).__name__})"
        else:
            reason = self.envelope_problem(payload)
            if reason is None:
                return payload
        self.set_aside(queue, item, reason)
        return None

    def set_aside(self, queue: str, item: bytes, reason: str) -> None:
        key = malformed_key(queue)
        with self.conn_or_acquire() as client:
            with client.pipeline() as pipe:
                pipe.lpush(key, item)
                pipe.ltrim(key, 0, KEEP_PER_QUEUE - 1)
                pipe.hincrby(MALFORMED_COUNTS_KEY, queue, 1)
                pipe.execute()
        log_event("broker.message.malformed", logging.WARNING, queue=queue, reason=reason, bytes=len(item),
                  kept_in=key)

    def _brpop_read(self, **options):
        # kombu's _brpop_read, with the decode step guarded.
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                # Disconnect so the next iteration reconnects (as kombu does).
                self.client.connection.disconnect()
                raise
            if not dest__item:
                raise kombu_redis.Empty()
            dest, item = dest__item
            dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            payload = self.decode_or_set_aside(dest, item)
            if payload is not None:
                self.connection._deliver(payload, dest)
            return True
        finally:
            self._in_poll = None

    def _get(self, queue):
        with self.conn_or_acquire() as client:
            for pri in self.priority_steps:
                while True:
                    item = client.rpop(self._q_for_pri(queue, pri))
                    if not item:
                        break
                    payload = self.decode_or_set_aside(queue, item)
                    if payload is not None:
                        return payload
            raise kombu_redis.Empty()


class Transport(kombu_redis.Transport):
    Channel = Channel
