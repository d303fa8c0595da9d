"""The Hetzner fake behaves like the API where the runner depends on it, in-process and standalone."""

from __future__ import annotations

import subprocess
import sys
import time

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
        server_type=ServerType(name="cpx22"),
        image=Image(name="ubuntu-24.04"),
        location=Location(name=location),
        ssh_keys=[SSHKey(name="k")],
        labels=labels or {},
    )


def test_hcloud_creates_waits_lists_and_deletes_through_the_fake():
    with FakeHetzner(action_seconds=0.2, ssh_keys=("k",)) as fake:
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


def raw(fake, method, path, body=None):
    return httpx.request(
        method, f"{fake.url}{path}", json=body, headers={"Authorization": "Bearer t"}
    )


def server_body(**overrides):
    return {
        "name": "agent-a",
        "server_type": "cpx22",
        "image": "ubuntu-24.04",
        "location": "ash",
        "ssh_keys": ["k"],
        **overrides,
    }


def test_server_types_are_sold_per_location_with_their_own_deprecation(fake_hetzner):
    client = Client(token="t", api_endpoint=fake_hetzner.url)

    cx23 = client.server_types.get_by_name("cx23")
    cpx11 = client.server_types.get_by_name("cpx11")

    assert [entry.location.name for entry in cx23.locations] == ["fsn1", "nbg1", "hel1"]
    assert all(entry.deprecation is None for entry in cx23.locations)
    assert {entry.location.name for entry in cpx11.locations} >= {"ash", "hil", "sin"}
    assert all(entry.deprecation is not None for entry in cpx11.locations)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"server_type": "cx23", "location": "ash"}, "location"),  # not sold in ash
        ({"server_type": "cpx11"}, "location"),  # deprecated, past unavailable_after
        ({"ssh_keys": ["nobody-has-this-key"]}, "ssh_keys"),
    ],
    ids=["not-sold-there", "withdrawn-type", "unknown-ssh-key"],
)
def test_an_unorderable_create_is_invalid_input_400_in_hetzners_error_shape(
    fake_hetzner, overrides, field
):
    answer = raw(fake_hetzner, "POST", "/servers", server_body(**overrides))

    assert answer.status_code == 400
    error = answer.json()["error"]
    assert set(error) == {"code", "message", "details"}
    assert error["code"] == "invalid_input"
    assert field in [f["name"] for f in error["details"]["fields"]]
    assert fake_hetzner.servers == []


def test_stop_selling_can_leave_the_listing_behind(fake_hetzner):
    fake_hetzner.stop_selling("cx23", "fsn1", still_listed=True)
    fake_hetzner.stop_selling("cx23", "hel1")
    client = Client(token="t", api_endpoint=fake_hetzner.url)

    listed = [e.location.name for e in client.server_types.get_by_name("cx23").locations]
    answer = raw(fake_hetzner, "POST", "/servers", server_body(server_type="cx23", location="fsn1"))

    assert listed == ["fsn1", "nbg1"]
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_input"


def test_the_project_server_limit_is_resource_limit_exceeded_403(fake_hetzner):
    fake_hetzner.server_limit = 1
    assert raw(fake_hetzner, "POST", "/servers", server_body()).status_code == 201

    answer = raw(fake_hetzner, "POST", "/servers", server_body(name="agent-b"))

    assert answer.status_code == 403
    assert answer.json()["error"]["code"] == "resource_limit_exceeded"
    assert len(fake_hetzner.servers) == 1


def test_an_unavailable_location_is_resource_unavailable_403(fake_hetzner):
    fake_hetzner.make_unavailable("ash")

    answer = raw(fake_hetzner, "POST", "/servers", server_body())

    assert answer.status_code == 403
    assert answer.json()["error"]["code"] == "resource_unavailable"


def test_deleting_a_server_while_its_create_action_runs_is_locked_423():
    with FakeHetzner(action_seconds=0.3, ssh_keys=("k",)) as fake:
        created = raw(fake, "POST", "/servers", server_body()).json()["server"]

        answer = raw(fake, "DELETE", f"/servers/{created['id']}")

        assert answer.status_code == 423
        assert answer.json()["error"]["code"] == "locked"
        assert len(fake.servers) == 1


def test_rate_limit_headers_on_every_answer_and_429_when_spent():
    with FakeHetzner(rate_limit=2, rate_refill_seconds=0.5) as fake:
        first = raw(fake, "GET", "/locations")
        raw(fake, "GET", "/locations")
        spent = raw(fake, "GET", "/locations")

        assert first.headers["RateLimit-Limit"] == "2"
        assert first.headers["RateLimit-Remaining"] == "1"
        assert int(first.headers["RateLimit-Reset"]) >= int(time.time())
        assert spent.status_code == 429
        assert spent.json()["error"]["code"] == "rate_limit_exceeded"
        assert spent.headers["RateLimit-Remaining"] == "0"
        # hcloud waits and retries a rate_limit_exceeded by itself
        client = Client(token="t", api_endpoint=fake.url)
        assert client.locations.get_by_name("ash") is not None


def test_state_survives_a_restart_and_no_ipv4_is_handed_out_twice(tmp_path):
    state = tmp_path / "var" / "fake-hetzner.json"
    with FakeHetzner(state_file=state, ssh_keys=("k",)) as fake:
        first = raw(fake, "POST", "/servers", server_body()).json()["server"]
        raw(fake, "DELETE", f"/servers/{first['id']}")
        second = raw(fake, "POST", "/servers", server_body(name="agent-b")).json()["server"]

    with FakeHetzner(state_file=state, ssh_keys=("k",)) as restarted:
        assert [s["id"] for s in restarted.servers] == [second["id"]]
        third = raw(restarted, "POST", "/servers", server_body(name="agent-c")).json()["server"]
        kept = raw(restarted, "GET", f"/servers/{second['id']}").json()["server"]

    addresses = [s["public_net"]["ipv4"]["ip"] for s in (first, second, third)]
    assert len(set(addresses)) == 3
    assert kept["public_net"]["ipv4"]["ip"] == addresses[1]
    assert third["id"] not in (first["id"], second["id"])
