"""The provisioning workflow and its playbook pass the offline linters, and keep their contract.

Linters: actionlint (with shellcheck for the `run:` scripts), check-jsonschema against GitHub's
workflow schema, and `ansible-playbook --syntax-check`. All come with the dev extra; a test is
skipped (saying which binary) only when one is missing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from provisioning.backends.base import MODES, run_title
from tests.fakes.github import WORKFLOW_INPUTS

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = REPO_ROOT / ".github" / "workflows" / "provision.yml"
WORKFLOWS = sorted((REPO_ROOT / ".github" / "workflows").glob("*.y*ml"))
PLAYBOOK = REPO_ROOT / "provisioning" / "runner" / "playbook" / "site.yml"
VENV_BIN = Path(sys.executable).parent
SEARCH_PATH = f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"


def tool(name: str) -> str:
    found = shutil.which(name, path=SEARCH_PATH)
    if found is None:
        pytest.skip(f"{name} is not installed: pip install -e '.[dev]'")
    return found


def run(*command: str, cwd: Path = REPO_ROOT, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command,
        cwd=cwd,
        env={**os.environ, "PATH": SEARCH_PATH, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.name)
def test_actionlint_with_shellcheck_finds_nothing(workflow):
    actionlint, shellcheck = tool("actionlint"), tool("shellcheck")

    result = run(actionlint, f"-shellcheck={shellcheck}", str(workflow))

    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_really_runs_shellcheck(tmp_path):
    actionlint, shellcheck = tool("actionlint"), tool("shellcheck")
    bad = tmp_path / "bad.yml"
    bad.write_text(
        "on: push\njobs:\n  a:\n    runs-on: ubuntu-24.04\n    steps:\n      - run: echo $X\n"
    )

    result = run(actionlint, f"-shellcheck={shellcheck}", str(bad))

    assert "SC2086" in result.stdout


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_matches_githubs_schema(workflow):
    check_jsonschema = tool("check-jsonschema")

    result = run(check_jsonschema, "--builtin-schema", "vendor.github-workflows", str(workflow))

    assert result.returncode == 0, result.stdout + result.stderr


def test_playbook_passes_ansible_syntax_check(tmp_path):
    ansible_playbook = tool("ansible-playbook")

    result = run(
        ansible_playbook,
        "--syntax-check",
        "-i",
        "localhost,",
        str(PLAYBOOK),
        ANSIBLE_LOCAL_TEMP=str(tmp_path),
        ANSIBLE_HOME=str(tmp_path),
    )

    assert result.returncode == 0, result.stdout + result.stderr


def _workflow() -> dict:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load(WORKFLOW.read_text())


def test_workflow_grants_only_an_id_token_and_serialises_runs_per_job():
    workflow = _workflow()
    job = workflow["jobs"]["provision"]

    assert workflow["permissions"] == {}
    assert job["permissions"] == {"id-token": "write", "contents": "read"}
    assert job["concurrency"] == {
        "group": "${{ inputs.mode == 'cleanup' && 'cleanup' || 'provision' }}-${{ inputs.job_id }}",
        "cancel-in-progress": False,
    }
    assert job["environment"] == "production"
    assert job["if"] == "github.event_name == 'workflow_dispatch'"
    # The service finds a dispatched run by this title; scheduled runs say what they are.
    assert workflow["run-name"] == (
        "${{ github.event_name == 'schedule' && 'reap managed servers' "
        "|| format('{0} {1} attempt {2}', inputs.mode, inputs.job_id, inputs.attempt) }}"
    )
    # PyYAML reads the bare key `on` as True.
    inputs = workflow[True]["workflow_dispatch"]["inputs"]
    assert set(inputs) == {"job_id", "attempt", "mode"}
    assert inputs["mode"]["options"] == ["provision", "cleanup", "deprovision"]


def _concurrency_group(expression: str, *, mode: str, job_id: str) -> str:
    """Evaluate the one expression shape the group uses: `${{ inputs.mode == 'x' && 'a' || 'b' }}`
    and `${{ inputs.job_id }}`, so the test reads the workflow instead of repeating it."""

    def evaluate(match: re.Match[str]) -> str:
        body = match.group(1).strip()
        if body == "inputs.job_id":
            return job_id
        cond = re.fullmatch(r"inputs\.mode == '(\w+)' && '(\w+)' \|\| '(\w+)'", body)
        if cond is None:
            raise AssertionError(f"unexpected expression in the concurrency group: {body}")
        wanted, then, otherwise = cond.groups()
        return then if mode == wanted else otherwise

    return re.sub(r"\$\{\{(.*?)\}\}", evaluate, expression)


def test_a_cleanup_run_never_shares_a_concurrency_group_with_a_provision_run():
    """A group holds one running and one pending run; a newer pending run cancels the older one.
    A retry sent while the failed run still finishes must not cancel the job's pending cleanup."""
    group = _workflow()["jobs"]["provision"]["concurrency"]["group"]
    job_id = "0b7c6a52-7d5e-4b7a-9a51-3f8f7f0c2d11"

    groups = {mode: _concurrency_group(group, mode=mode, job_id=job_id) for mode in MODES}

    assert groups["provision"] == groups["deprovision"] == f"provision-{job_id}"
    assert groups["cleanup"] == f"cleanup-{job_id}"
    other = _concurrency_group(group, mode="cleanup", job_id="another")
    assert other != groups["cleanup"]


def test_the_run_name_is_the_title_the_service_looks_runs_up_by():
    run_name = _workflow()["run-name"]
    [fmt] = re.findall(
        r"format\('([^']*)', inputs\.mode, inputs\.job_id, inputs\.attempt\)", run_name
    )
    job_id = "0b7c6a52-7d5e-4b7a-9a51-3f8f7f0c2d11"

    for mode in MODES:
        title = fmt.replace("{0}", mode).replace("{1}", job_id).replace("{2}", "3")
        assert title == run_title(job_id=job_id, attempt=3, mode=mode)


def test_the_fake_github_checks_dispatch_inputs_against_the_workflows_inputs():
    inputs = _workflow()[True]["workflow_dispatch"]["inputs"]

    assert set(inputs) == set(WORKFLOW_INPUTS)
    for name, spec in inputs.items():
        options = tuple(spec["options"]) if "options" in spec else None
        assert options == WORKFLOW_INPUTS[name], name


def test_the_reaper_runs_every_15_minutes_in_its_own_job_with_only_an_id_token():
    workflow = _workflow()
    job = workflow["jobs"]["reap"]

    assert workflow[True]["schedule"] == [{"cron": "*/15 * * * *"}]
    assert job["if"] == "github.event_name == 'schedule'"
    assert job["environment"] == "production"
    assert job["permissions"] == {"id-token": "write", "contents": "read"}
    assert job["concurrency"] == {"group": "reap", "cancel-in-progress": False}
    commands = [s["run"] for s in job["steps"] if "provisioning.runner" in s.get("run", "")]
    assert commands == ["python -m provisioning.runner reap"]
    [reap] = [s for s in job["steps"] if s.get("run") == commands[0]]
    assert reap["timeout-minutes"] > 0
    assert reap["env"] == {"HCLOUD_TOKEN": "${{ secrets.HCLOUD_TOKEN }}"}
    assert "ansible" not in str(job["steps"])


def test_no_expression_is_spliced_into_a_script():
    jobs = _workflow()["jobs"]
    steps = [step for job in jobs.values() for step in job["steps"]]

    scripts = [step["run"] for step in steps if "run" in step]

    assert scripts
    assert not [s for s in scripts if "${{" in s]


def test_steps_run_in_the_contract_order_with_timeouts_and_a_failure_handler():
    steps = _workflow()["jobs"]["provision"]["steps"]
    commands = [
        m.group(1)
        for step in steps
        if (m := re.search(r"python -m provisioning\.runner ([a-z-]+)", step.get("run", "")))
    ]

    assert commands == [
        "claim",
        "heartbeat-loop",
        "create-server",
        "wait-ssh",
        "configure",
        "health-check",
        "delete-servers",
        "complete",
        "cleanup",
        "fail",
    ]
    by_command = {
        m.group(1): step
        for step in steps
        if (m := re.search(r"python -m provisioning\.runner ([a-z-]+)", step.get("run", "")))
    }
    for name in ("create-server", "wait-ssh", "configure", "health-check", "complete"):
        assert by_command[name]["timeout-minutes"] > 0
    assert "failure() || cancelled()" in by_command["fail"]["if"]
    assert "nohup" in by_command["heartbeat-loop"]["run"]
    checkout = next(s for s in steps if s.get("uses", "").startswith("actions/checkout@"))
    # Pinned to a commit: tests/workflows/test_supply_chain.py checks every `uses:`.
    assert checkout["uses"] == "actions/checkout@08c6903cd8c0fde910a37f88322edcfb5dd907a8"
    assert checkout["with"]["persist-credentials"] is False


def _tasks(node):
    """Every task of the playbook, in blocks and handlers too."""
    if isinstance(node, list):
        for item in node:
            yield from _tasks(item)
    elif isinstance(node, dict):
        if any(key.startswith("ansible.builtin.") for key in node):
            yield node
        for key in ("tasks", "pre_tasks", "post_tasks", "handlers", "block", "rescue", "always"):
            if key in node:
                yield from _tasks(node[key])


def test_every_apt_task_waits_long_enough_for_the_dpkg_lock():
    """A fresh Ubuntu runs unattended-upgrades right after boot; apt waits 60 s by default."""
    yaml = pytest.importorskip("yaml")
    plays = yaml.safe_load(PLAYBOOK.read_text())
    apt_tasks = [t["ansible.builtin.apt"] for t in _tasks(plays) if "ansible.builtin.apt" in t]

    assert apt_tasks
    for task in apt_tasks:
        assert int(task.get("lock_timeout", 60)) >= 600, task
