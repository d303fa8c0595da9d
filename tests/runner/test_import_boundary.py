"""One-way imports, checked on the source.

- The runner ships to GitHub's runner with only requirements.txt: no Django, no app modules.
- Billing builds on provisioning, never the other way round: no module under provisioning/
  imports billing (config/urls.py is where the two meet).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

RUNNER_DIR = Path(__file__).resolve().parents[2] / "provisioning" / "runner"
REPO_ROOT = RUNNER_DIR.parents[1]
PROVISIONING_DIR = REPO_ROOT / "provisioning"
RUNNER_MODULES = [
    f"provisioning.runner.{p.stem}"
    for p in sorted(RUNNER_DIR.glob("*.py"))
    if p.stem not in {"__init__", "__main__"}
]


def test_importing_the_runner_loads_no_django_and_no_other_app_module():
    probe = (
        "import importlib, sys\n"
        f"for name in {RUNNER_MODULES!r}:\n"
        "    importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m == 'django' or m.startswith('django.')\n"
        "             or (m.startswith('provisioning.') and not m.startswith('provisioning.runner')))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}

    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=REPO_ROOT,
        env={**env, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert len(RUNNER_MODULES) >= 6


def test_no_runner_source_file_imports_django_or_reaches_outside_the_package():
    offenders = []
    for path in sorted(RUNNER_DIR.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level > 1:
                    offenders.append(f"{path.name}: from {'.' * node.level}{node.module or ''}")
                    continue
                names = [node.module or ""] if node.level == 0 else []
            else:
                continue
            for name in names:
                root = name.split(".")[0]
                if root in {"django", "rest_framework", "djstripe"} or (
                    root == "provisioning" and not name.startswith("provisioning.runner")
                ):
                    offenders.append(f"{path.name}: import {name}")

    assert offenders == []


def _imported_names(path: Path) -> list[str]:
    """Every module `path` imports by name: import statements and import_module("...") calls."""
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.append(node.module or "")
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names.append(node.args[0].value)
    return names


def test_no_provisioning_module_imports_billing():
    sources = sorted(PROVISIONING_DIR.rglob("*.py"))
    offenders = [
        f"{path.relative_to(REPO_ROOT)}: import {name}"
        for path in sources
        for name in _imported_names(path)
        if name.split(".")[0] == "billing"
    ]

    assert offenders == []
    assert len(sources) > 40  # the walk found the package


def test_the_billing_check_catches_an_import(tmp_path):
    module = tmp_path / "probe.py"
    module.write_text(
        "import billing.services\n"
        "from billing import views\n"
        "def f():\n"
        "    from billing.models import Agent\n"
        "    importlib.import_module('billing.sample_events')\n"
    )

    assert _imported_names(module) == [
        "billing.services",
        "billing",
        "billing.models",
        "billing.sample_events",
    ]
