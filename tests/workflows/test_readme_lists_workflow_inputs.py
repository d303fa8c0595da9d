"""The README's "Running the real workflow" section names every secret and variable the workflow
reads, and nothing it does not: an operator sets up the `production` environment from that list."""

from __future__ import annotations

import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = REPO_ROOT / ".github" / "workflows" / "provision.yml"
README = REPO_ROOT / "README.md"


def _workflow_reads(kind: str) -> set[str]:
    return set(re.findall(rf"\b{kind}\.([A-Za-z_][A-Za-z0-9_]*)", WORKFLOW.read_text()))


def _readme_section() -> str:
    text = README.read_text()
    start = text.index("## Running the real workflow against GitHub and Hetzner")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def _readme_lists(label: str, until: str) -> set[str]:
    section = _readme_section()
    start = section.index(f"{label}:")
    return set(re.findall(r"`([A-Z][A-Z0-9_]*)`", section[start : section.index(until, start)]))


def test_the_workflow_reads_secrets_and_variables():
    assert _workflow_reads("secrets")
    assert _workflow_reads("vars")


def test_every_secret_the_workflow_reads_is_in_the_readme_and_no_other():
    assert _readme_lists("Secrets", "Variables:") == _workflow_reads("secrets")


def test_every_variable_the_workflow_reads_is_in_the_readme_and_no_other():
    assert _readme_lists("Variables", "The workflow reads exactly these") == _workflow_reads("vars")


def test_the_readme_states_the_environment_rules():
    section = _readme_section()

    assert "no protection rules" in section
    assert "`GITHUB_REAPER_REF`" in section
    assert "60 days" in section
