"""What the workflows run next to the secrets is pinned, and the Hetzner token goes only where needed.

- every action is pinned to a full commit SHA, its release named in a trailing comment;
- the runner's dependencies install only from hashed locks, whose pins agree with pyproject.toml
  (one ansible-core range for the tests and the runner);
- HCLOUD_TOKEN reaches exactly the steps whose command talks to Hetzner.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from provisioning.runner import pipeline
from provisioning.runner.config import ConfigError, Settings

yaml = pytest.importorskip("yaml")

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((REPO_ROOT / ".github" / "workflows").glob("*.y*ml"))
PROVISION = REPO_ROOT / ".github" / "workflows" / "provision.yml"
RUNNER_DIR = REPO_ROOT / "provisioning" / "runner"
RUNNER_LOCK = RUNNER_DIR / "requirements.lock"
ANSIBLE_LOCK = RUNNER_DIR / "requirements-ansible.lock"
LOCK_INPUTS = {
    RUNNER_LOCK: RUNNER_DIR / "requirements.txt",
    ANSIBLE_LOCK: RUNNER_DIR / "requirements-ansible.txt",
}

# `uses: owner/repo[/path]@<40 hex> # v1.2.3` (the comment is what humans and Dependabot read).
PINNED_USE = re.compile(
    r"^\s*(?:-\s+)?uses:\s+(?P<action>[\w.-]+/[\w./-]+)@(?P<sha>[0-9a-f]{40})"
    r"\s+#\s+(?P<version>v\d+(?:\.\d+){0,2})\s*$"
)
ANY_USE = re.compile(r"^\s*(?:-\s+)?uses:\s*(?P<ref>\S+)")
RUNNER_COMMAND = re.compile(r"python -m provisioning\.runner ([a-z-]+)")
HASH = re.compile(r"--hash=sha256:[0-9a-f]{64}")


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def all_steps(workflow: dict) -> list[tuple[str, dict]]:
    return [(name, step) for name, job in workflow["jobs"].items() for step in job["steps"]]


# -- actions ---------------------------------------------------------------------------------
def test_there_are_workflows_to_check():
    assert {p.name for p in WORKFLOWS} >= {"provision.yml", "ci.yml"}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_every_action_is_pinned_to_a_commit_sha_with_its_release_in_a_comment(path):
    lines = [line for line in path.read_text().splitlines() if ANY_USE.match(line)]
    from_yaml = [step["uses"] for _, step in all_steps(load(path)) if "uses" in step]

    unpinned = [line.strip() for line in lines if not PINNED_USE.match(line)]

    assert lines, f"{path.name} uses no action: is the pattern still right?"
    assert len(lines) == len(from_yaml), "a `uses:` the line pattern does not see"
    assert unpinned == []


def test_an_action_is_pinned_to_one_commit_and_release_everywhere():
    pins: dict[str, set[tuple[str, str]]] = {}
    for path in WORKFLOWS:
        for line in path.read_text().splitlines():
            if m := PINNED_USE.match(line):
                pins.setdefault(m["action"], set()).add((m["sha"], m["version"]))

    assert {"actions/checkout", "actions/setup-python"} <= set(pins)
    assert {action: refs for action, refs in pins.items() if len(refs) > 1} == {}


def test_the_pin_pattern_refuses_tags_branches_and_short_shas():
    for line in (
        "      - uses: actions/checkout@v5",
        "      - uses: actions/checkout@main",
        "      - uses: actions/checkout@08c6903 # v5.0.0",
        "      - uses: actions/checkout@08c6903cd8c0fde910a37f88322edcfb5dd907a8",
        "        uses: actions/checkout@08c6903cd8c0fde910a37f88322edcfb5dd907a8 # five",
    ):
        assert ANY_USE.match(line)
        assert not PINNED_USE.match(line), line
    good = "        uses: actions/checkout@08c6903cd8c0fde910a37f88322edcfb5dd907a8 # v5.0.0"
    assert PINNED_USE.match(good)


# -- the runner's dependencies ---------------------------------------------------------------
def lock_pins(path: Path) -> dict[str, tuple[Version, int]]:
    """{name: (version, number of hashes)} from a pip-compile --generate-hashes lock."""
    text = re.sub(r"\\\n", " ", path.read_text())
    pins: dict[str, tuple[Version, int]] = {}
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        if not line:
            continue
        assert not line.startswith("-"), f"{path.name}: option line {line!r}"
        requirement, _, options = line.partition(" --hash")
        name, sep, version = requirement.strip().partition("==")
        assert sep and re.fullmatch(r"[A-Za-z0-9._-]+", name), f"{path.name}: not pinned: {line!r}"
        hashes = HASH.findall("--hash" + options)
        assert hashes, f"{path.name}: {name} has no sha256 hash"
        pins[canonicalize_name(name)] = (Version(version), len(hashes))
    return pins


def input_requirements(path: Path) -> dict[str, Requirement]:
    requirements = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            requirement = Requirement(line)
            requirements[canonicalize_name(requirement.name)] = requirement
    return requirements


def pyproject_requirements(extra: str | None = None) -> dict[str, Requirement]:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    lines = project["optional-dependencies"][extra] if extra else project["dependencies"]
    return {canonicalize_name(r.name): r for r in map(Requirement, lines)}


@pytest.mark.parametrize("lock", list(LOCK_INPUTS), ids=lambda p: p.name)
def test_every_locked_distribution_is_pinned_with_a_sha256_hash(lock):
    pins = lock_pins(lock)

    assert pins
    assert all(count >= 1 for _, count in pins.values())


@pytest.mark.parametrize("lock", list(LOCK_INPUTS), ids=lambda p: p.name)
def test_a_lock_satisfies_the_ranges_it_was_compiled_from(lock):
    pins = lock_pins(lock)
    wanted = input_requirements(LOCK_INPUTS[lock])

    assert wanted
    outside = {
        name: str(pins.get(name, ("missing",))[0])
        for name, requirement in wanted.items()
        if name not in pins or pins[name][0] not in requirement.specifier
    }
    assert outside == {}


def test_the_two_locks_agree_on_every_distribution_they_share():
    runner, ansible = lock_pins(RUNNER_LOCK), lock_pins(ANSIBLE_LOCK)
    shared = runner.keys() & ansible.keys()

    assert [n for n in shared if runner[n][0] != ansible[n][0]] == []


def test_the_runner_lock_pins_httpx_and_hcloud_inside_pyprojects_ranges():
    pins, project = lock_pins(RUNNER_LOCK), pyproject_requirements()

    for name in ("httpx", "hcloud"):
        assert pins[name][0] in project[name].specifier, name


def test_one_ansible_core_range_for_the_tests_and_the_runner():
    dev = pyproject_requirements("dev")["ansible-core"]
    runner_input = input_requirements(LOCK_INPUTS[ANSIBLE_LOCK])["ansible-core"]
    locked, _ = lock_pins(ANSIBLE_LOCK)["ansible-core"]

    assert runner_input.specifier == dev.specifier
    assert locked in dev.specifier
    # The range must not admit a release that drops Python 3.11 (2.20 needs 3.12).
    assert Version("2.20.0") not in dev.specifier


def install_commands(workflow: dict) -> list[tuple[str, list[str]]]:
    commands = []
    for job, step in all_steps(workflow):
        script = re.sub(r"\\\n\s*", " ", step.get("run", ""))
        for line in script.splitlines():
            if "pip install" in line:
                commands.append((job, shlex.split(line.strip())))
    return commands


def test_the_runner_installs_only_from_hashed_locks_without_resolving_or_building():
    commands = install_commands(load(PROVISION))
    locks = {(job, argv[argv.index("-r") + 1]) for job, argv in commands if "-r" in argv}

    assert commands
    for _, argv in commands:
        assert {"--require-hashes", "--no-deps"} <= set(argv), argv
        assert argv[argv.index("--only-binary") + 1] == ":all:", argv
        # Nothing but the one lock file: no package named on the command line.
        assert argv.count("-r") == 1 and argv[-2] == "-r", argv
    assert locks == {
        ("provision", "provisioning/runner/requirements.lock"),
        ("provision", "provisioning/runner/requirements-ansible.lock"),
        ("reap", "provisioning/runner/requirements.lock"),
    }
    for _, lock in locks:
        assert (REPO_ROOT / lock).is_file()


def test_the_pip_cache_is_keyed_on_the_locks():
    for job in load(PROVISION)["jobs"].values():
        [setup] = [s for s in job["steps"] if "setup-python" in s.get("uses", "")]
        keyed = set(setup["with"]["cache-dependency-path"].split())
        installed = {
            argv[argv.index("-r") + 1] for _, argv in install_commands({"jobs": {"j": job}})
        }
        assert keyed == installed


# -- HCLOUD_TOKEN ----------------------------------------------------------------------------
HETZNER_STEPS = {
    ("provision", "create-server"),
    ("provision", "delete-servers"),
    ("provision", "cleanup"),
    ("provision", "fail"),
    ("reap", "reap"),
}


def test_hcloud_token_reaches_exactly_the_steps_that_call_hetzner():
    workflow = load(PROVISION)
    given = set()
    for job, step in all_steps(workflow):
        if "HCLOUD_TOKEN" in str(step):
            command = RUNNER_COMMAND.search(step.get("run", ""))
            assert command, f"{step.get('name')} gets HCLOUD_TOKEN but runs no runner command"
            assert step["env"]["HCLOUD_TOKEN"] == "${{ secrets.HCLOUD_TOKEN }}"
            given.add((job, command.group(1)))

    assert given == HETZNER_STEPS


def test_no_job_or_workflow_env_carries_the_hetzner_token():
    workflow = load(PROVISION)

    assert "HCLOUD_TOKEN" not in str(workflow.get("env", {}))
    for name, job in workflow["jobs"].items():
        # No secret at all at job level: every step (and the heartbeat loop) would inherit it.
        assert "HCLOUD_TOKEN" not in str(job.get("env", {})), name
        assert "secrets." not in str(job.get("env", {})), name


def test_the_claim_step_needs_no_hetzner_token_and_the_others_still_do():
    settings = Settings.from_env(
        {
            "PROVISIONING_API_URL": "http://127.0.0.1:9",
            "PROVISIONING_OIDC_AUDIENCE": "audience",
            "ACTIONS_ID_TOKEN_REQUEST_URL": "http://127.0.0.1:9/token",
            "ACTIONS_ID_TOKEN_REQUEST_TOKEN": "request-token",
            "RUNNER_SIMULATE": "1",
        }
    )

    for mode in ("provision", "deprovision"):
        pipeline.preflight(settings, mode, needs_cloud=False)  # the claim step: no token, fine
        with pytest.raises(ConfigError, match="HCLOUD_TOKEN"):
            pipeline.preflight(settings, mode)
