"""The real VM steps: wait for SSH, run the Ansible playbook, poll the agent's health endpoint.

Each takes `sleep` (which raises if the run was fenced out meanwhile) and `log`, so a long wait
stops promptly and its output ends up in the failure report's tail.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from .config import PLAYBOOK, Settings


class RemoteError(Exception):
    pass


def _ssh_options(settings: Settings, known_hosts: Path) -> list[str]:
    return [
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=accept-new",
        "-o",
        f"UserKnownHostsFile={known_hosts}",
        "-o",
        "ConnectTimeout=10",
        "-i",
        str(settings.ssh_private_key_file),
    ]


def wait_ssh(
    settings: Settings,
    ip: str,
    known_hosts: Path,
    *,
    sleep: Callable[[float], object],
    log: Callable[[str], None],
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Until the port answers, then until a login works and cloud-init has finished."""
    settings.require("ssh_private_key_file")
    deadline = clock() + settings.ssh_timeout_seconds
    last = "no attempt yet"
    while clock() < deadline:
        try:
            with socket.create_connection((ip, 22), timeout=5):
                pass
        except OSError as exc:
            last = f"ssh: connect to host {ip} port 22: {exc.strerror or exc}"
            sleep(5)
            continue
        probe = subprocess.run(
            [
                "ssh",
                *_ssh_options(settings, known_hosts),
                f"{settings.ssh_user}@{ip}",
                "cloud-init status --wait >/dev/null 2>&1; true",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if probe.returncode == 0:
            log(f"ssh to {settings.ssh_user}@{ip} works")
            return
        last = (probe.stderr or probe.stdout).strip()[-500:] or f"ssh exited {probe.returncode}"
        log(f"ssh not ready: {last}")
        sleep(5)
    raise RemoteError(f"{last} (gave up after {settings.ssh_timeout_seconds:.0f}s)")


def configure(
    settings: Settings,
    ip: str,
    known_hosts: Path,
    variables: dict[str, str],
    workdir: Path,
    *,
    on_task: Callable[[int], None],
    log: Callable[[str], None],
    checkpoint: Callable[[], None],
) -> None:
    """Run the playbook against the VM, streaming its output into the log."""
    settings.require("ssh_private_key_file")
    # YAML with every value tagged !unsafe: the agent's name is customer text, and Ansible
    # would otherwise evaluate any Jinja in it on this runner, where the secrets are. Written as
    # UTF-8, not \u escapes: a name outside the Basic Multilingual Plane would otherwise become a
    # surrogate pair that YAML refuses.
    vars_file = workdir / "agent-vars.yml"
    vars_file.write_text(
        "".join(
            f"{key}: !unsafe {json.dumps(str(value), ensure_ascii=False)}\n"
            for key, value in variables.items()
        ),
        encoding="utf-8",
    )
    ssh_args = " ".join(_ssh_options(settings, known_hosts)[:-2])
    command = [
        settings.ansible_playbook,
        "-i",
        f"{ip},",
        "-u",
        settings.ssh_user,
        "--private-key",
        str(settings.ssh_private_key_file),
        "-e",
        f"@{vars_file}",
        "-e",
        json.dumps({"ansible_ssh_common_args": ssh_args}),
        str(PLAYBOOK),
    ]
    env = {
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
        "ANSIBLE_RETRY_FILES_ENABLED": "0",
        "PYTHONUNBUFFERED": "1",
    }
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **env},
    )
    tasks = 0
    if process.stdout is None:  # cannot happen with stdout=PIPE; keeps the type honest
        process.kill()
        raise RemoteError("ansible-playbook started without an output pipe")
    try:
        for line in process.stdout:
            log(line.rstrip())
            if line.startswith("TASK ["):
                tasks += 1
                on_task(tasks)
            checkpoint()
    finally:
        if process.poll() is None:
            process.terminate()
        returncode = process.wait()
    if returncode != 0:
        raise RemoteError(f"ansible-playbook exited with status {returncode}")


def health_check(
    settings: Settings,
    ip: str,
    *,
    sleep: Callable[[float], object],
    log: Callable[[str], None],
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Poll `http://<ip>:<port>/healthz` until it answers 200 `{"status": "ok"}`."""
    url = f"http://{ip}:{settings.health_port}/healthz"
    deadline = clock() + settings.health_timeout_seconds
    tries, last = 0, "no attempt yet"
    with httpx.Client(timeout=5) as http:
        while clock() < deadline:
            tries += 1
            try:
                response = http.get(url)
                if response.status_code == 200 and response.json().get("status") == "ok":
                    log(f"GET {url}: healthy after {tries} tries")
                    return
                last = f"HTTP {response.status_code} {response.text[:200]}"
            except (httpx.HTTPError, ValueError, AttributeError) as exc:
                last = repr(exc)
            sleep(3)
    raise RemoteError(f"GET {url}: {last} after {tries} tries")
