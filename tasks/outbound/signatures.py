"""Signing a request with Standard Webhooks, the form every signed call out of the system carries."""

from __future__ import annotations

from datetime import datetime, timezone

from standardwebhooks.webhooks import Webhook


def standard_webhook_headers(secrets: list[str], message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The Standard Webhooks headers of one request: ``webhook-id``, ``webhook-timestamp`` and
    ``webhook-signature`` (one ``v1,<base64>`` per secret, space-separated).

    A ``whsec_`` secret is read as the specification says (base64 of the key, the library's
    reading); any other text is used as the key's bytes as they are.
    """
    moment = datetime.fromtimestamp(timestamp, tz=timezone.utc)
    signatures = " ".join(
        Webhook(secret if secret.startswith("whsec_") else secret.encode()).sign(message_id, moment, body)
        for secret in secrets)
    return {"webhook-id": message_id, "webhook-timestamp": str(timestamp), "webhook-signature": signatures}
