"""`Cloud` in-process against the fake: what hcloud does not retry by itself, the runner does."""

from __future__ import annotations

import httpx

from provisioning.runner.config import Settings
from provisioning.runner.hetzner import Cloud
from tests.fakes.hetzner import FakeHetzner


def test_a_delete_answered_locked_while_the_create_runs_is_retried_until_it_goes():
    with FakeHetzner(action_seconds=0.5, ssh_keys=("k",)) as fake:
        created = httpx.post(
            f"{fake.url}/servers",
            json={
                "name": "agent-a",
                "server_type": "cpx22",
                "image": "ubuntu-24.04",
                "location": "ash",
                "ssh_keys": ["k"],
            },
            headers={"Authorization": "Bearer t"},
        ).json()["server"]
        settings = Settings.from_env(
            {
                "HCLOUD_TOKEN": "t",
                "HCLOUD_API_ENDPOINT": fake.url,
                "RUNNER_HCLOUD_POLL_SECONDS": "0.05",
            }
        )

        assert Cloud(settings).delete(str(created["id"])) is True

        assert fake.servers == []
        deletes = [r for r in fake.requests if r["method"] == "DELETE"]
        assert len(deletes) >= 2, "the first delete should have met the running create"
