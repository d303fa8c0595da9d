"""The launch simulation's fake GitHub (bench/launch/fake_github.py) behaves as documented, seen
through the service's own GitHub backend on a real loopback socket: a run waits `queued` until a
runner slot frees; a spent budget is answered like GitHub (403 + x-ratelimit-remaining: 0 and
x-ratelimit-reset; 429 + retry-after for the secondary limit); an unchanged run list answers 304
to its ETag without spending the budget."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization

from bench.launch.fake_github import FakeGitHub, FakeRun
from provisioning.backends.base import DispatchError
from provisioning.backends.github import GitHubBackend
from tests.fakes.github import shared_app_key

APP_ID = "31337"
INSTALLATION_ID = "4242"
REPO = "example/agent-provisioning"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Gate:
    """A player that holds each run until the test releases it."""

    def __init__(self) -> None:
        self.started: list[FakeRun] = []
        self.release: dict[int, threading.Event] = {}
        self._lock = threading.Lock()

    def __call__(self, run: FakeRun) -> str:
        event = threading.Event()
        with self._lock:
            self.release[run.id] = event
            self.started.append(run)
        event.wait(10)
        return "success"

    def let_go(self, run_id: int) -> None:
        self.release[run_id].set()


def _pem() -> tuple[str, str]:
    key = shared_app_key()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return private, public


@pytest.fixture
def make_fake() -> Iterator[Callable[..., tuple[FakeGitHub, GitHubBackend]]]:
    made: list[tuple[FakeGitHub, GitHubBackend]] = []
    private, public = _pem()

    def make(**kwargs: Any) -> tuple[FakeGitHub, GitHubBackend]:
        fake = FakeGitHub(
            app_id=APP_ID, installation_id=INSTALLATION_ID, app_public_key_pem=public, **kwargs
        ).start()
        backend = GitHubBackend(
            repository=REPO,
            workflow_file="provision.yml",
            ref="main",
            app_id=APP_ID,
            installation_id=INSTALLATION_ID,
            private_key=private,
            api_url=fake.url,
        )
        made.append((fake, backend))
        return fake, backend

    yield make
    for fake, backend in made:
        backend.close()
        fake.stop()


def _wait_until(check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 10
    while not check():
        assert time.monotonic() < deadline, "the fake did not get there within 10 s"
        time.sleep(0.01)


def test_a_run_stays_queued_until_a_runner_slot_frees(make_fake):
    gate = Gate()
    fake, backend = make_fake(slots=2, player=gate)
    runs = [
        backend.dispatch(job_id=uuid.uuid4(), attempt=1, mode="provision").run_id for _ in range(3)
    ]
    assert all(runs)
    _wait_until(lambda: len(gate.started) == 2)
    statuses = [backend.get_run(run_id=str(r)).status for r in runs]  # type: ignore[union-attr]
    assert statuses == ["in_progress", "in_progress", "queued"]
    assert fake.running() == 2 and fake.queued() == 1

    gate.let_go(int(runs[0]))  # type: ignore[arg-type]
    _wait_until(lambda: len(gate.started) == 3)
    first = backend.get_run(run_id=str(runs[0]))
    third = backend.get_run(run_id=str(runs[2]))
    assert first is not None and (first.status, first.conclusion) == ("completed", "success")
    assert third is not None and third.status == "in_progress"
    assert fake.max_running == 2 and fake.max_unfinished == 3
    for run_id in runs[1:]:
        gate.let_go(int(run_id))  # type: ignore[arg-type]


def test_cancel_completes_a_queued_run_and_a_finished_one_answers_409(make_fake):
    gate = Gate()
    fake, backend = make_fake(slots=1, player=gate)
    busy = backend.dispatch(job_id=uuid.uuid4(), attempt=1, mode="provision").run_id
    waiting = backend.dispatch(job_id=uuid.uuid4(), attempt=1, mode="provision").run_id
    backend.cancel_run(run_id=str(waiting))
    run = backend.get_run(run_id=str(waiting))
    assert run is not None and (run.status, run.conclusion) == ("completed", "cancelled")
    gate.let_go(int(busy))  # type: ignore[arg-type]
    _wait_until(lambda: fake.running() == 0)
    assert len(gate.started) == 1  # the cancelled run never got the slot
    response = httpx.post(
        f"{fake.url}/repos/{REPO}/actions/runs/{busy}/cancel",
        headers={"Authorization": f"Bearer {backend._installation_token()}"},
    )
    assert response.status_code == 409


def test_a_re_dispatch_while_github_holds_the_run_is_counted(make_fake):
    fake, backend = make_fake(slots=0)  # nothing ever leaves the queue
    job = uuid.uuid4()
    backend.dispatch(job_id=job, attempt=1, mode="provision")
    backend.dispatch(job_id=job, attempt=2, mode="provision")  # a new attempt: not a re-send
    assert fake.resent_while_held == 0
    backend.dispatch(job_id=job, attempt=2, mode="provision")
    assert fake.resent_while_held == 1


def test_a_spent_budget_is_answered_403_with_the_reset_and_refills_with_the_window(make_fake):
    clock = Clock()
    fake, backend = make_fake(slots=0, rate_limit=3, window_seconds=60, clock=clock)
    for _ in range(3):
        backend.dispatch(job_id=uuid.uuid4(), attempt=1, mode="provision")

    token = backend._installation_token()  # the token call is the App's, not the budget's
    response = httpx.get(
        f"{fake.url}/repos/{REPO}/actions/runs", headers={"Authorization": f"Bearer {token}"}
    )
    assert response.status_code == 403
    assert response.headers["x-ratelimit-remaining"] == "0"
    reset = int(response.headers["x-ratelimit-reset"])
    assert time.time() < reset <= time.time() + 61
    assert "rate limit" in response.json()["message"]

    with pytest.raises(DispatchError) as refused:
        backend.dispatch(job_id=uuid.uuid4(), attempt=1, mode="provision")
    assert refused.value.status == 403 and refused.value.retry_after is not None
    assert fake.rate_limited == 2
    assert len(fake.runs) == 3  # nothing was dispatched past the budget

    clock.now += 60  # the window rolls over: the budget is whole again
    assert backend.dispatch(job_id=uuid.uuid4(), attempt=1, mode="provision").run_id
    assert sum(1 for c in fake.calls if c.counted) == 4


def test_the_secondary_limit_on_dispatches_answers_429_with_retry_after(make_fake):
    clock = Clock()
    _fake, backend = make_fake(slots=0, secondary_limit=2, secondary_window_seconds=60, clock=clock)
    for _ in range(2):
        backend.dispatch(job_id=uuid.uuid4(), attempt=1, mode="provision")
    with pytest.raises(DispatchError) as refused:
        backend.dispatch(job_id=uuid.uuid4(), attempt=1, mode="provision")
    assert refused.value.status == 429
    assert refused.value.retry_after == 60
    clock.now += 61
    assert backend.dispatch(job_id=uuid.uuid4(), attempt=1, mode="provision").run_id


def test_an_unchanged_run_list_answers_304_to_its_etag_without_spending(make_fake):
    fake, backend = make_fake(slots=0)
    backend.dispatch(job_id=uuid.uuid4(), attempt=1, mode="provision")
    url = f"{fake.url}/repos/{REPO}/actions/workflows/provision.yml/runs"
    auth = {"Authorization": f"Bearer {backend._installation_token()}"}
    params = {"status": "queued", "per_page": "100", "page": "1"}

    first = httpx.get(url, params=params, headers=auth)
    assert first.status_code == 200
    assert first.json()["total_count"] == 1
    etag = first.headers["ETag"]
    used = int(first.headers["x-ratelimit-used"])

    again = httpx.get(url, params=params, headers={**auth, "If-None-Match": etag})
    assert again.status_code == 304
    assert int(again.headers["x-ratelimit-used"]) == used  # a 304 costs nothing

    backend.dispatch(job_id=uuid.uuid4(), attempt=1, mode="provision")
    changed = httpx.get(url, params=params, headers={**auth, "If-None-Match": etag})
    assert changed.status_code == 200 and changed.headers["ETag"] != etag
    assert changed.json()["total_count"] == 2
    assert [c.status for c in fake.calls if c.route == "list"] == [200, 304, 200]


def test_the_list_pages_by_100_with_a_link_to_the_next_page(make_fake):
    fake, backend = make_fake(slots=0)
    for _ in range(3):
        backend.dispatch(job_id=uuid.uuid4(), attempt=1, mode="provision")
    url = f"{fake.url}/repos/{REPO}/actions/runs"
    auth = {"Authorization": f"Bearer {backend._installation_token()}"}
    page = httpx.get(url, params={"per_page": "2"}, headers=auth)
    assert len(page.json()["workflow_runs"]) == 2
    assert 'rel="next"' in page.headers["Link"]
    ids = [r["id"] for r in page.json()["workflow_runs"]]
    assert ids == sorted(ids, reverse=True)  # newest first


def test_an_app_jwt_from_another_key_gets_no_token(make_fake):
    from tests.fakes.github import new_rsa_key

    fake, _ = make_fake(slots=0)
    other = new_rsa_key().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    intruder = GitHubBackend(
        repository=REPO,
        workflow_file="provision.yml",
        ref="main",
        app_id=APP_ID,
        installation_id=INSTALLATION_ID,
        private_key=other.decode(),
        api_url=fake.url,
    )
    with pytest.raises(DispatchError) as refused:
        intruder.dispatch(job_id=uuid.uuid4(), attempt=1, mode="provision")
    intruder.close()
    assert refused.value.status == 401
    assert fake.runs == {}


class _Receiver:
    """A loopback endpoint recording what the fake's webhook deliveries carried."""

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.deliveries: list[tuple[dict[str, str], bytes]] = []
        received = self.deliveries

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append((dict(self.headers.items()), body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/github/webhook/"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def test_each_run_is_announced_by_signed_workflow_run_webhooks(make_fake):
    import json

    from provisioning.api.github_webhook import signature_for

    receiver = _Receiver()
    try:
        fake, backend = make_fake(webhook_secret="s3cret")
        fake.webhook_url = receiver.url
        run_id = backend.dispatch(job_id=uuid.uuid4(), attempt=1, mode="provision").run_id
        _wait_until(lambda: len(receiver.deliveries) == 3)
    finally:
        receiver.stop()
    actions = []
    for headers, body in receiver.deliveries:
        assert headers["X-GitHub-Event"] == "workflow_run"
        assert headers["X-Hub-Signature-256"] == signature_for(body, "s3cret")
        payload = json.loads(body)
        assert payload["workflow_run"]["id"] == int(run_id or 0)
        assert payload["repository"]["full_name"] == REPO
        actions.append(payload["action"])
    assert sorted(actions) == ["completed", "in_progress", "requested"]
    assert sum(fake.webhooks.values()) == 3 and fake.webhooks_dropped == 0


def test_lost_deliveries_are_counted_and_not_sent(make_fake):
    receiver = _Receiver()
    try:
        fake, backend = make_fake(webhook_secret="s3cret", webhook_drop_share=1.0)
        fake.webhook_url = receiver.url
        backend.dispatch(job_id=uuid.uuid4(), attempt=1, mode="provision")
        _wait_until(lambda: fake.webhooks_dropped == 3)
        time.sleep(0.2)
    finally:
        receiver.stop()
    assert receiver.deliveries == []
