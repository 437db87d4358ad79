"""A receiver built on nothing but the ``standardwebhooks`` library verifies real deliveries.

The receiver below is what a service author writes from docs/integration.md: an HTTP handler
that hands the raw body and the headers to ``Webhook(secret).verify``. Deliveries come from a
real ``webhooks`` worker after a real reset confirmed through the HTTP API; during a secret
rotation each delivery verifies with the old secret and with the new one, each on its own.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from tests.notify_support import wait_until
from tests.test_http_api import api_env, start_api, tenants  # noqa: F401 - fixtures
from tests.test_webhooks_e2e import ALL_QUEUES, a_learner, hook_env, run_reset  # noqa: F401 - hook_env is a fixture

pytestmark = pytest.mark.e2e


class StandardReceiver:
    """Records, per request, which of its secrets verified it (``Webhook(secret).verify``)."""

    def __init__(self):
        self.secrets: list[str] = []
        self.verified: list[tuple[str, dict, list[str]]] = []  # (webhook-id, payload, secrets that verified)
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = dict(self.headers.items())
                ok, payload = [], None
                for secret in list(receiver.secrets):
                    try:
                        payload = Webhook(secret).verify(body, headers)
                        ok.append(secret)
                    except WebhookVerificationError:
                        pass
                with receiver.lock:
                    receiver.verified.append((headers.get("webhook-id", ""), payload, ok))
                self.send_response(204 if ok else 401)
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/standard"

    def got(self) -> list[tuple[str, dict, list[str]]]:
        with self.lock:
            return list(self.verified)


@pytest.fixture
def receiver():
    made = StandardReceiver()
    yield made
    made.server.shutdown()
    made.server.server_close()


def test_a_standard_webhooks_receiver_verifies_real_deliveries_and_both_secrets_of_a_rotation(
        hook_env, tenants, start_api, celery_worker_proc, receiver):
    a = tenants.a
    celery_worker_proc(hook_env, queues=ALL_QUEUES, concurrency=2, name="std")
    server = start_api(hook_env)
    with server.client(a.key) as api:
        created = api.post("/v1/webhooks", json={"url": receiver.url, "events": ["reset.confirmed"]})
        assert created.status_code == 201, created.text
        first_secret = created.json()["secret"]
        assert first_secret.startswith("whsec_")
        receiver.secrets = [first_secret]
        job = run_reset(api, a, a.course_ids[0], a_learner(a.course_ids[0]))
        wait_until(lambda: len(receiver.got()) >= 1, 30, what="the first delivery")
        event_id, payload, ok = receiver.got()[0]
        assert ok == [first_secret], "the library verified the delivery with the endpoint's secret"
        assert payload["id"] == event_id and payload["type"] == "reset.confirmed"
        assert payload["data"]["job_id"] == job

        rotated = api.post(f"/v1/webhooks/{created.json()['id']}/rotate-secret", json={"overlap_seconds": 3600})
        assert rotated.status_code == 200, rotated.text
        new_secret = rotated.json()["secret"]
        receiver.secrets = [first_secret, new_secret, "whsec_" + "A" * 44]  # the last one was never ours
        run_reset(api, a, a.course_ids[1], a_learner(a.course_ids[1]))
        wait_until(lambda: len(receiver.got()) >= 2, 30, what="the delivery during the rotation")
        _event_id, _payload, ok = receiver.got()[1]
        assert ok == [first_secret, new_secret], "each secret of the overlap verifies on its own, a stranger's none"
