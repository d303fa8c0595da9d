"""schemathesis over /api/schema/ against the live server -> no 5xx."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

from django.contrib.sessions.backends.db import SessionStore

from bench.common import ROOT
from bench.reliability.conftest import figure, knob


def _session_cookie(user) -> str:
    session = SessionStore()
    session["_auth_user_id"] = str(user.pk)
    session["_auth_user_backend"] = "django.contrib.auth.backends.ModelBackend"
    session["_auth_user_hash"] = user.get_session_auth_hash()
    session.create()
    return session.session_key or ""


def test_schemathesis_finds_no_server_error(stack, make_users, issuer, workdir):
    seconds = knob("RELIABILITY_SCHEMATHESIS_SECONDS", 60)
    (user,) = make_users("schema", 1)
    token = issuer.mint(run_id="4242", run_attempt=1)
    report = Path(workdir) / "schemathesis.txt"
    t0 = time.monotonic()
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "schemathesis"),
            "run",
            f"{stack.base_url}/api/schema/",
            "--checks",
            "not_a_server_error",
            "--max-time",
            str(seconds),
            "--workers",
            "2",
            "--no-color",
            "-H",
            f"Authorization: Bearer {token}",
            "-H",
            f"Cookie: sessionid={_session_cookie(user)}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=seconds + 300,
        check=False,
    )
    took = time.monotonic() - t0
    out = done.stdout + done.stderr
    report.write_text(out)
    cases = re.findall(r"(\d+) generated", out)
    figure(
        f"[schemathesis] exit {done.returncode} in {took:.0f}s; "
        + " ".join(
            ln.strip()
            for ln in out.splitlines()
            if re.search(r"passed|failed|generated|Test cases|Operations", ln)
        )[:600]
        + (f"; cases {cases}" if cases else "")
    )
    if done.returncode != 0:
        print(out[-6000:])
    assert done.returncode == 0, out[-3000:]
