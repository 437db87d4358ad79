"""One delivery attempt: sign the event, POST it, and classify the receiver's answer.

Never raises for the receiver's faults: every answer (or its absence) becomes an
:class:`~tasks.webhooks.deliveries.AttemptOutcome`. Redirects are not followed.
"""

from __future__ import annotations

import time

import httpx

from models.errors import ValidationFailed
from models.receiver_urls import check_url
from models.settings import Settings
from tasks.outbound import parse_retry_after
from tasks.webhooks.deliveries import MAX_ERROR_TEXT, AttemptOutcome, ClaimedDelivery
from tasks.webhooks.signing import body_bytes, signed_headers

USER_AGENT = "progress-reset-webhooks/1"


def send_delivery(claimed: ClaimedDelivery, settings: Settings, client: httpx.Client | None = None) -> AttemptOutcome:
    """POST the event to the endpoint, signed; classify the answer. Never raises for the receiver's faults."""
    try:
        check_url(claimed.url, settings.webhooks_allow_http_loopback)
    except ValidationFailed as exc:
        return AttemptOutcome(False, False, error=f"refused: {exc}")
    body = body_bytes(claimed.payload)
    timestamp = int(time.time())
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        **signed_headers(claimed.secrets, str(claimed.event_id), timestamp, body),
        "X-Event-Type": claimed.event_type,
        "X-Delivery-Id": str(claimed.delivery_id),
        "X-Delivery-Attempt": str(claimed.attempt),
    }
    timeout = settings.webhooks_timeout_seconds
    own = client is None
    client = client or httpx.Client(timeout=httpx.Timeout(timeout, connect=min(timeout, 3.0)), follow_redirects=False,
                                    trust_env=False)
    try:
        response = client.post(claimed.url, content=body, headers=headers)
    except httpx.TimeoutException:
        return AttemptOutcome(False, True, error=f"timed out after {timeout:g}s")
    except httpx.HTTPError as exc:
        return AttemptOutcome(False, True, error=f"{type(exc).__name__}: {str(exc)[:200]}")
    finally:
        if own:
            client.close()
    code = response.status_code
    if 200 <= code < 300:
        return AttemptOutcome(True, False, code)
    text = response.text[:MAX_ERROR_TEXT] if response.text else ""
    if code in (408, 429) or code >= 500:
        return AttemptOutcome(False, True, code, f"HTTP {code} {text}".strip(),
                       retry_after=parse_retry_after(response.headers.get("Retry-After")))
    if 300 <= code < 400:
        return AttemptOutcome(False, False, code, f"HTTP {code}: redirects are not followed; register the final URL")
    return AttemptOutcome(False, False, code, f"HTTP {code} {text}".strip())
