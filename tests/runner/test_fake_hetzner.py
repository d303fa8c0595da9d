"""The Hetzner fake behaves like the API where the runner depends on it, in-process and standalone."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest
from hcloud import APIException, Client
from hcloud.images import Image
from hcloud.locations import Location
from hcloud.server_types import ServerType
from hcloud.ssh_keys import SSHKey

from provisioning.localdev.fake_hetzner import FakeHetzner, labels_match
from tests.runner.conftest import REPO_ROOT


def create(client, name, labels=None, location="ash"):
    return client.servers.create(
        name=name,
        server_type=ServerType(name="cpx11"),
        image=Image(name="ubuntu-24.04"),
        location=Location(name=location),
        ssh_keys=[SSHKey(name="k")],
        labels=labels or {},
    )


def test_hcloud_creates_waits_lists_and_deletes_through_the_fake():
    with FakeHetzner(action_seconds=0.2) as fake:
        client = Client(token="t", api_endpoint=fake.url, poll_interval=0.05)
        response = create(client, "agent-a", {"job-id": "a"})
        assert response.server.status == "initializing"
        response.action.wait_until_finished()

        server = client.servers.get_by_id(response.server.id)
        assert server.status == "running"
        assert server.public_net.ipv4.ip.startswith("203.0.113.")
        assert [s.name for s in client.servers.get_all(label_selector="job-id=a")] == ["agent-a"]

        client.servers.delete(server).wait_until_finished()
        assert fake.servers == []


def test_a_duplicate_name_is_a_uniqueness_error(fake_hetzner):
    client = Client(token="t", api_endpoint=fake_hetzner.url)
    create(client, "agent-a")

    with pytest.raises(APIException) as caught:
        create(client, "agent-a")

    assert caught.value.code == "uniqueness_error"
    assert len(fake_hetzner.servers) == 1


def test_requests_without_a_token_are_refused(fake_hetzner):
    answer = httpx.get(f"{fake_hetzner.url}/servers")

    assert answer.status_code == 401
    assert answer.json()["error"]["code"] == "unauthorized"


def test_listing_pages_through_many_servers(fake_hetzner):
    for n in range(60):
        fake_hetzner.add_server(name=f"s{n}", labels={"batch": "x"})
    client = Client(token="t", api_endpoint=fake_hetzner.url)

    assert len(client.servers.get_all(label_selector="batch=x")) == 60


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("job-id=a", True),
        ("job-id==a", True),
        ("job-id=b", False),
        ("job-id!=b", True),
        ("job-id", True),
        ("!job-id", False),
        ("job-id in (b, a)", True),
        ("job-id notin (a)", False),
        ("managed-by=agent-provisioning,job-id=a", True),
        ("managed-by=agent-provisioning,job-id=b", False),
    ],
)
def test_label_selectors(selector, expected):
    labels = {"managed-by": "agent-provisioning", "job-id": "a"}

    assert labels_match(labels, selector) is expected


def test_the_fake_runs_as_its_own_process():
    process = subprocess.Popen(
        [sys.executable, "-m", "provisioning.localdev.fake_hetzner", "--port", "0"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        banner = process.stdout.readline()
        url = banner.strip().rsplit(" ", 1)[-1]
        answer = httpx.get(f"{url}/locations", headers={"Authorization": "Bearer t"})
    finally:
        process.terminate()
        process.wait(timeout=10)

    assert answer.status_code == 200
    assert "ash" in [loc["name"] for loc in answer.json()["locations"]]
    assert process.returncode == 0
