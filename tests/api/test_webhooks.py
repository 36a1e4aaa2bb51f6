"""Job webhooks against a real receiving HTTP server on 127.0.0.1: signed, verifiable POSTs for a finished and a
failed job, retries after a receiver error, and callback URLs refused before any job runs."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer, ThreadingHTTPServer
from pathlib import Path

import pytest

from app.engine.webhooks import UrlPolicy, WebhookSender
from app.errors import InvalidInputError
from tests.conftest import serve

pytestmark = pytest.mark.anyio
KEY = "user-key-0123456789abcdef"


class Receiver(ThreadingHTTPServer):
    """Records every POST; answers 500 to the first `failures` of them."""

    def __init__(self, failures: int = 0) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.failures = failures
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook"


class _Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
        failing = len(self.server.received) <= self.server.failures
        self.send_response(500 if failing else 204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def receiver(request: pytest.FixtureRequest) -> Iterator[Receiver]:
    server = Receiver(getattr(request, "param", 0))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def verify(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """What a receiver does: recompute the signature over `<t>.<body>` and check that t is recent."""
    fields = dict(part.split("=", 1) for part in headers["x-synthgen-signature"].split(","))
    expected = hmac.new(secret.encode(), f"{fields['t']}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, fields["v1"]) and abs(time.time() - int(fields["t"])) < 300


async def until(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("receiver", [1], indirect=True)  # the first delivery gets a 500 and is retried
async def test_finished_and_failed_jobs_are_posted_signed(faulty_models_dir: Path, receiver: Receiver) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    async with serve(faulty_models_dir, api_keys=KEY, webhook_allow_hosts="127.0.0.1",
                     webhook_backoff_s=0.05) as client:
        secret = (await client.get("/v1/webhooks/secret", headers=auth)).json()["secret"]
        assert len(secret) == 64
        good = (await client.post("/v1/jobs", headers=auth, json={"model": "digits-gan", "per_class": 2, "seed": 1,
                                                                     "callback_url": receiver.url})).json()
        await until(lambda: len(receiver.received) == 2)
        bad = (await client.post("/v1/jobs", headers=auth, json={"model": "faulty-gan", "n": 4, "label": 3,
                                                                    "callback_url": receiver.url})).json()
        await until(lambda: len(receiver.received) == 3)
    (first_headers, first_body), (headers, body), (failed_headers, failed_body) = receiver.received
    assert first_headers["x-synthgen-delivery"] == headers["x-synthgen-delivery"] and first_body == body  # a retry
    succeeded, failed = json.loads(body), json.loads(failed_body)
    assert headers["x-synthgen-event"] == succeeded["event"] == "job.succeeded"
    assert succeeded["data"]["id"] == good["id"] and succeeded["data"]["state"] == "succeeded"
    assert succeeded["data"]["files"][0]["url"].startswith(f"/v1/jobs/{good['id']}/files/")
    assert failed_headers["x-synthgen-event"] == "job.failed" and failed["data"]["id"] == bad["id"]
    assert "injected fault" in failed["data"]["error"]
    for hook_headers, hook_body in receiver.received:
        assert verify(secret, hook_headers, hook_body)
        assert not verify("another key's secret", hook_headers, hook_body)
        assert not verify(secret, hook_headers, hook_body.replace(b"\"total\"", b"\"totaL\""))


@pytest.mark.parametrize(("url", "message"), [
    ("ftp://example.com/x", "http:// or https://"),
    ("http://user:pw@example.com/x", "credentials"),
    ("http://127.0.0.1:9/x", "non-public address"),
    ("http://10.1.2.3/x", "non-public address"),
    ("http://[::1]/x", "non-public address"),
    ("http://169.254.169.254/latest/meta-data", "non-public address"),
    ("http://no-such-host.invalid/x", "does not resolve"),
    ("http://[::1/x", "not a well-formed URL"),
    ("http://[zz]/x", "not a well-formed URL"),
])
async def test_callback_urls_are_refused_before_the_job_runs(models_dir: Path, url: str, message: str) -> None:
    async with serve(models_dir) as client:
        response = await client.post("/v1/jobs", json={"model": "digits-gan", "n": 2, "callback_url": url})
        assert response.status_code == 422 and message in response.json()["detail"], response.text
        assert (await client.get("/v1/jobs")).json()["jobs"] == []


def test_the_allow_list_takes_hosts_and_networks() -> None:
    policy = UrlPolicy(["10.0.0.0/8", "localhost"])
    policy.check("http://10.20.30.40:8080/hook")
    policy.check("http://localhost/hook")
    with pytest.raises(InvalidInputError):
        policy.check("http://192.168.1.1/hook")


async def test_a_delivery_connects_to_the_address_it_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    hosts: list[str | None] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            hosts.append(self.headers.get("Host"))
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    lookups: list[str] = []
    real = socket.getaddrinfo

    def rebinding(host: str, *args: object, **kwargs: object) -> object:  # checked: 127.0.0.1; later: 127.0.0.2
        if host in ("rebind.example", b"rebind.example"):
            lookups.append(host)
            return real("127.0.0.1" if len(lookups) == 1 else "127.0.0.2", *args, **kwargs)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    sender = WebhookSender(b"master", UrlPolicy(["127.0.0.1/32"]), max_attempts=1)
    try:
        sender.send(f"http://rebind.example:{server.server_port}/hook", "", "job.finished", {"id": "x"})
        await asyncio.gather(*sender._tasks)
    finally:
        await sender.close()
        server.shutdown()
    # one lookup (the check), and the POST went to the address that passed it, named by its Host header
    assert lookups == ["rebind.example"] and hosts == [f"rebind.example:{server.server_port}"]
