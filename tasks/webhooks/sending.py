"""One delivery attempt: check the receiver's URL, sign the event, POST it, classify the answer.

Never raises for the receiver's faults: every answer (or its absence) becomes an
:class:`~tasks.webhooks.deliveries.AttemptOutcome`. The attempt ends by its total deadline
(``WEBHOOKS_TIMEOUT_SECONDS``: connect, send and the whole answer), reads at most 64 KiB of the
answer, connects to the addresses the URL check approved and follows no redirect.
"""

from __future__ import annotations

import time

from models.errors import ValidationFailed
from models.receiver_urls import check_url
from models.settings import Settings
from tasks.outbound.answers import parse_retry_after, redact
from tasks.outbound.deadline import Deadline
from tasks.outbound.http import CallFailed, post
from tasks.webhooks.deliveries import MAX_ERROR_TEXT, AttemptOutcome, ClaimedDelivery
from tasks.webhooks.signing import body_bytes, signed_headers

USER_AGENT = "progress-reset-webhooks/1"


def send_delivery(claimed: ClaimedDelivery, settings: Settings) -> AttemptOutcome:
    """POST the event to the endpoint, signed, within the deadline; classify the answer."""
    deadline = Deadline.after(settings.webhooks_timeout_seconds)
    try:
        checked = check_url(claimed.url, settings.webhooks_allow_http_loopback)
    except ValidationFailed as exc:
        return AttemptOutcome(False, False, error=f"refused: {exc}")
    body = body_bytes(claimed.payload)
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        **signed_headers(claimed.secrets, str(claimed.event_id), int(time.time()), body),
        "X-Event-Type": claimed.event_type,
        "X-Delivery-Id": str(claimed.delivery_id),
        "X-Delivery-Attempt": str(claimed.attempt),
    }
    try:
        answer = post(checked.url, body, headers, deadline, pinned=checked.pins())
    except CallFailed as failed:
        return AttemptOutcome(False, True, error=failed.reason)
    code = answer.status
    if 200 <= code < 300:
        return AttemptOutcome(True, False, code)
    text = redact(f"HTTP {code} {answer.text(MAX_ERROR_TEXT)}".strip(), MAX_ERROR_TEXT)
    if code in (408, 429) or code >= 500:
        return AttemptOutcome(False, True, code, text, retry_after=parse_retry_after(answer.headers.get("retry-after")))
    if 300 <= code < 400:
        return AttemptOutcome(False, False, code, f"HTTP {code}: redirects are not followed; register the final URL")
    return AttemptOutcome(False, False, code, text)
