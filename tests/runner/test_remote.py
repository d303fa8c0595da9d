"""The real (non-simulated) VM steps, with stand-ins for ansible-playbook and the VM's endpoint."""

from __future__ import annotations

import json
import stat
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from provisioning.runner import remote
from provisioning.runner.config import Settings
from tests.fakes.clock import FakeClock


def settings_for(tmp_path, **env):
    key = tmp_path / "id_ed25519"
    key.write_text("not a real key\n")
    return Settings.from_env(
        {
            "RUNNER_SSH_PRIVATE_KEY_FILE": str(key),
            "RUNNER_HEALTH_TIMEOUT_SECONDS": "3",
            **env,
        }
    )


def fake_ansible(tmp_path, exit_code):
    script = tmp_path / "ansible-playbook"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$@" > {tmp_path}/argv\n'
        'for arg in "$@"; do case "$arg" in @*) cp "${arg#@}" '
        + f"{tmp_path}/vars.yml;; esac; done\n"
        "echo 'TASK [Install the Python runtime] ***'\n"
        "echo 'TASK [Create the agent user] ***'\n"
        'echo \'fatal: [203.0.113.9]: FAILED! => {"msg": "boom"}\'\n'
        f"exit {exit_code}\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_configure_passes_customer_text_as_unsafe_and_streams_tasks(tmp_path):
    settings = settings_for(tmp_path, RUNNER_ANSIBLE_PLAYBOOK=fake_ansible(tmp_path, 0))
    lines, tasks = [], []

    remote.configure(
        settings,
        "203.0.113.9",
        tmp_path / "known_hosts",
        {"agent_name": "{{ lookup('pipe', 'id') }}", "job_id": "j"},
        tmp_path,
        on_task=tasks.append,
        log=lines.append,
        checkpoint=lambda: None,
    )

    assert tasks == [1, 2]
    assert any("FAILED!" in line for line in lines)
    variables = (tmp_path / "vars.yml").read_text().splitlines()
    assert variables[0] == "agent_name: !unsafe \"{{ lookup('pipe', 'id') }}\""
    assert "203.0.113.9," in (tmp_path / "argv").read_text()


def test_configure_raises_when_ansible_fails(tmp_path):
    settings = settings_for(tmp_path, RUNNER_ANSIBLE_PLAYBOOK=fake_ansible(tmp_path, 2))

    with pytest.raises(remote.RemoteError, match="status 2"):
        remote.configure(
            settings,
            "203.0.113.9",
            tmp_path / "known_hosts",
            {},
            tmp_path,
            on_task=lambda _n: None,
            log=lambda _line: None,
            checkpoint=lambda: None,
        )


class _Health(BaseHTTPRequestHandler):
    answers: list[tuple[int, dict]] = []

    def do_GET(self):
        status, body = self.answers.pop(0) if self.answers else (200, {"status": "ok"})
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def vm_endpoint():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def test_health_check_polls_until_the_agent_says_ok(tmp_path, vm_endpoint):
    _Health.answers = [(503, {"status": "starting"})]
    settings = settings_for(tmp_path, RUNNER_HEALTH_PORT=str(vm_endpoint.server_address[1]))
    lines = []

    remote.health_check(settings, "127.0.0.1", sleep=lambda _s: None, log=lines.append)

    assert "healthy after 2 tries" in lines[-1]


def test_health_check_gives_up_with_the_last_answer(tmp_path, vm_endpoint):
    _Health.answers = [(503, {"status": "starting"})] * 10_000
    settings = settings_for(
        tmp_path,
        RUNNER_HEALTH_PORT=str(vm_endpoint.server_address[1]),
        RUNNER_HEALTH_TIMEOUT_SECONDS="30",
    )
    clock = FakeClock()

    with pytest.raises(remote.RemoteError, match=r"HTTP 503.* after 10 tries"):
        remote.health_check(
            settings, "127.0.0.1", sleep=clock.sleep, log=lambda _l: None, clock=clock.now
        )

    assert clock.sleeps == [3] * 10  # every 3 s until the 30 s are up, in no real time


def test_wait_ssh_retries_a_closed_port_every_5s_until_its_timeout(tmp_path, monkeypatch):
    settings = settings_for(tmp_path, RUNNER_SSH_TIMEOUT_SECONDS="60")
    clock = FakeClock()

    def refused(address, timeout):
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(remote.socket, "create_connection", refused)

    with pytest.raises(
        remote.RemoteError, match=r"port 22: Connection refused \(gave up after 60s"
    ):
        remote.wait_ssh(
            settings,
            "203.0.113.9",
            tmp_path / "known_hosts",
            sleep=clock.sleep,
            log=lambda _l: None,
            clock=clock.now,
        )

    assert clock.sleeps == [5] * 12


@pytest.mark.parametrize("name", ["\U0001d400gent", "\U00020000 bot", "café-1", "{{ 7 * 7 }}"])
def test_any_accepted_name_survives_the_vars_file_as_ansible_reads_it(tmp_path, name):
    from ansible.parsing.yaml.loader import AnsibleLoader

    settings = settings_for(tmp_path, RUNNER_ANSIBLE_PLAYBOOK=fake_ansible(tmp_path, 0))

    remote.configure(
        settings,
        "203.0.113.9",
        tmp_path / "known_hosts",
        {"agent_name": name, "job_id": "j"},
        tmp_path,
        on_task=lambda _n: None,
        log=lambda _line: None,
        checkpoint=lambda: None,
    )

    loaded = AnsibleLoader((tmp_path / "vars.yml").read_text(encoding="utf-8")).get_single_data()
    assert str(loaded["agent_name"]) == name


def test_every_step_of_a_run_shares_one_known_hosts_beside_the_state_file(tmp_path):
    """wait-ssh and configure are separate processes: the host key the first learns must be the
    one the second trusts, so it lives in $RUNNER_TEMP, not in a step's own temporary workdir."""
    from provisioning.runner.pipeline import Runner
    from provisioning.runner.state import RunState

    runner_temp = tmp_path / "runner-temp"
    runner_temp.mkdir()
    settings = settings_for(tmp_path, RUNNER_TEMP=str(runner_temp))
    wait_ssh_step = Runner(settings, RunState(job_id="j", attempt=1))
    configure_step = Runner(settings, RunState(job_id="j", attempt=1))

    learned = wait_ssh_step.known_hosts
    learned.write_text("203.0.113.9 ssh-ed25519 AAAA\n")
    wait_ssh_step.close()

    assert learned.parent == runner_temp
    assert configure_step.known_hosts == learned
    assert learned.read_text() == "203.0.113.9 ssh-ed25519 AAAA\n"  # outlives the step
    assert not learned.is_relative_to(configure_step.workdir)
    configure_step.close()


def test_configure_hands_ansible_the_shared_known_hosts(tmp_path):
    runner_temp = tmp_path / "runner-temp"
    runner_temp.mkdir()
    settings = settings_for(
        tmp_path, RUNNER_TEMP=str(runner_temp), RUNNER_ANSIBLE_PLAYBOOK=fake_ansible(tmp_path, 0)
    )
    from provisioning.runner.pipeline import Runner
    from provisioning.runner.state import RunState

    step = Runner(settings, RunState(job_id="j", attempt=1))

    remote.configure(
        settings,
        "203.0.113.9",
        step.known_hosts,
        {},
        tmp_path,
        on_task=lambda _n: None,
        log=lambda _line: None,
        checkpoint=lambda: None,
    )

    assert f"UserKnownHostsFile={runner_temp}/" in (tmp_path / "argv").read_text()
    step.close()
