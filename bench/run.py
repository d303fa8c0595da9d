"""`make bench`: every path against its ceiling, measured in one run on this machine, one table.

    .venv/bin/python bench/run.py [--quick] [--no-write] [--no-profile]

First the database's own floor: pgbench single-row INSERT and UPDATE (one client) on the same
PostgreSQL. In-process rows come from bench/queue_core.py (databases bench_core and bench_procrastinate on
PGHOST:PGPORT, dropped and recreated). The HTTP rows (heartbeat endpoint vs a bare view, webhook
vs a bare view) come from the other benchmarks beside this file when they exist
(bench/heartbeat_throughput.py, bench/webhook_throughput.py), run as subprocesses; until then
they say "pending". The table, the machine and the profiles go to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import common  # noqa: E402
from bench.common import Row  # noqa: E402

HTTP_SCRIPTS = (
    ("heartbeat endpoint vs bare view", "heartbeat_throughput.py"),
    ("signed webhook vs bare view", "webhook_throughput.py"),
    ("admin at scale", "admin_scale.py"),
)
NUMBER = r"([0-9][0-9,]*\.?[0-9]*)"


def machine() -> dict[str, str]:
    mem_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    import psycopg

    with psycopg.connect(common.dsn("postgres")) as conn:
        row = conn.execute("SHOW server_version").fetchone()
        pg = str(row[0]) if row else "?"
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "memory": f"{mem_kb / 1024 / 1024:.1f} GiB",
        "postgresql": pg,
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def _pgbench_binary() -> str | None:
    found = shutil.which("pgbench")
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/pgbench"), reverse=True)
    return str(candidates[0]) if candidates else None


PGBENCH_SCRIPTS = {
    "INSERT": "INSERT INTO floor_row (v, t) VALUES (1, now());\n",
    "UPDATE": "\\set id random(1, 10000)\nUPDATE floor_row SET v = v + 1, t = now() WHERE id = :id;\n",
}


def pgbench_floor(seconds: int) -> tuple[list[Row], list[str]]:
    """The database's own floor: pgbench, one client, single-row INSERT and UPDATE (each its own
    autocommit transaction, prepared), on the PostgreSQL under test, before anything else runs."""
    binary = _pgbench_binary()
    if binary is None:
        return [], ["pgbench floor: pgbench not found (postgresql client packages)"]
    dbname = common.DB_PREFIX + "bench_pgbench"
    common.recreate_db(dbname)
    import psycopg

    with psycopg.connect(common.dsn(dbname), autocommit=True) as conn:
        conn.execute("CREATE TABLE floor_row (id bigserial PRIMARY KEY, v int, t timestamptz)")
        conn.execute("INSERT INTO floor_row (v, t) SELECT 0, now() FROM generate_series(1, 10000)")
        conn.execute("VACUUM ANALYZE floor_row")
    rows: list[Row] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for what, script in PGBENCH_SCRIPTS.items():
            path = Path(tmp) / f"{what.lower()}.sql"
            path.write_text(script)
            cmd = [
                binary, "-n", "-c", "1", "-j", "1", "-M", "prepared", "-T", str(seconds),
                "-f", str(path), "-h", common.PGHOST, "-p", str(common.PGPORT),
                "-U", common.PGUSER, dbname,
            ]  # fmt: skip
            done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=600)
            tps = re.search(r"tps = ([0-9.]+)", done.stdout)
            latency = re.search(r"latency average = ([0-9.]+) ms", done.stdout)
            if done.returncode != 0 or not tps:
                notes.append(
                    f"pgbench {what}: exit {done.returncode}: {done.stderr.strip()[-300:]}"
                )
                continue
            rows.append(
                Row(
                    f"floor: pgbench single-row {what}, 1 client, autocommit",
                    float(tps.group(1)),
                    "tx/s",
                    f"latency {latency.group(1) if latency else '?'} ms (database only)",
                    None,
                    ratio_override="floor",
                )
            )
    common.drop_db(dbname)
    notes.append(
        "floor rows: pgbench -n -c 1 -M prepared -T "
        f"{seconds} on the same PostgreSQL, run first; every commit waits for its WAL flush, so "
        "this is the most any one-row write path can do on this machine at this moment"
    )
    return rows, notes


def http_rows(log: object = print) -> tuple[list[Row], list[str]]:
    """Run the other engineers' HTTP benchmarks if present; parse what they print.

    Understood outputs: a JSON line (an object, or a list of objects) with `path`, `figure`,
    `ceiling`, `ceiling_figure` (and optional `unit`), or a markdown table row whose cells are
    path | figure | ceiling | ceiling figure | ratio. Anything else is quoted in the notes.
    """
    rows: list[Row] = []
    notes: list[str] = []
    for label, script in HTTP_SCRIPTS:
        path = ROOT / "bench" / script
        if not path.exists():
            if script != "admin_scale.py":
                rows.append(
                    Row(
                        label,
                        None,
                        "req/s",
                        "bare view (same machine)",
                        None,
                        ratio_override="pending",
                    )
                )
                notes.append(f"{label}: bench/{script} does not exist yet (pending)")
            continue
        print(f"running bench/{script} …", flush=True)
        t0 = time.perf_counter()
        try:
            done = subprocess.run(
                [sys.executable, str(path)],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=900,
                check=False,
            )
        except subprocess.TimeoutExpired:
            rows.append(Row(label, None, "req/s", "bare view", None, ratio_override="timed out"))
            continue
        took = time.perf_counter() - t0
        parsed = _parse(done.stdout)
        if done.returncode != 0 or not parsed:
            rows.append(
                Row(
                    label,
                    None,
                    "req/s",
                    "bare view",
                    None,
                    ratio_override=f"exit {done.returncode}" if done.returncode else "unparsed",
                )
            )
        rows.extend(parsed)
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-12:])
        notes.append(
            f"{label}: bench/{script} exit {done.returncode} in {took:.0f}s; its output "
            f"ends:\n```\n{tail}\n```"
        )
    return rows, notes


KNOWN_LINES = (
    # (path, figure regex, ceiling, ceiling regex, unit) for the other benchmarks' summaries
    (
        "heartbeat endpoint (OIDC + DRF, fenced UPDATE), gunicorn",
        r"heartbeat API \(OIDC \+ DRF\)\s+([0-9.]+) req/s",
        "bare Django view, same UPDATE",
        r"bare Django view\s+([0-9.]+) req/s",
        "req/s",
    ),
    (
        "signed webhook -> agent + job (dj-stripe + fulfilment), gunicorn",
        r"dj-stripe webhook\s+([0-9.]+) events/s",
        "bare view, same inserts",
        r"bare view\s+([0-9.]+) events/s",
        "events/s",
    ),
)


def _parse(stdout: str) -> list[Row]:
    """JSON rows if the script printed any; else its known summary lines; else a markdown table."""
    rows: list[Row] = []
    for line in stdout.splitlines():
        line = line.strip()
        if not line.startswith(("{", "[")):
            continue
        try:
            data = json.loads(line)
        except ValueError:
            continue
        for item in data if isinstance(data, list) else [data]:
            if isinstance(item, dict) and "figure" in item:
                rows.append(
                    Row(
                        str(item.get("path", "?")),
                        float(item["figure"]),
                        str(item.get("unit", "req/s")),
                        str(item.get("ceiling", "bare view")),
                        float(item["ceiling_figure"]) if item.get("ceiling_figure") else None,
                        higher_is_better=bool(item.get("higher_is_better", True)),
                    )
                )
    if rows:
        return rows
    for path, fig_re, ceiling, ceil_re, unit in KNOWN_LINES:
        fig, ceil = re.search(fig_re, stdout), re.search(ceil_re, stdout)
        if fig:
            rows.append(
                Row(
                    path,
                    float(fig.group(1)),
                    unit,
                    ceiling,
                    float(ceil.group(1)) if ceil else None,
                )
            )
    if rows:
        return rows
    for line in stdout.splitlines():
        line = line.strip()
        if line.startswith("|") and not set(line) <= set("|-: "):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if len(cells) >= 4 and cells[0].lower() not in ("path", "row", "what", "case"):
                fig_m = re.search(NUMBER, cells[1])
                ceil_m = re.search(NUMBER, cells[3])
                if fig_m:
                    rows.append(
                        Row(
                            cells[0],
                            float(fig_m.group(1).replace(",", "")),
                            cells[1][fig_m.end() :].strip() or "req/s",
                            cells[2],
                            float(ceil_m.group(1).replace(",", "")) if ceil_m else None,
                        )
                    )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="100k rows instead of 1M, fewer ops")
    parser.add_argument("--no-write", action="store_true", help="do not rewrite bench/RESULTS.md")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--no-http", action="store_true", help="skip the HTTP benchmarks")
    args = parser.parse_args()

    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    t0 = time.perf_counter()
    info = machine()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), flush=True)

    print("pgbench floor …", flush=True)
    floor_rows, floor_notes = pgbench_floor(5 if args.quick else 10)
    for row in floor_rows:
        print(f"  {row.path}: {row.figure:,.0f} tx/s, {row.ceiling}", flush=True)

    from bench import queue_core

    def log(msg: str) -> None:
        print(msg, flush=True)

    print("queue core (in process) …", flush=True)
    core = queue_core.run(
        big=100_000 if args.quick else 1_000_000,
        ops=200 if args.quick else 500,
        dispatch_jobs=1000 if args.quick else 2000,
        do_profile=not args.no_profile,
        log=log,
    )
    rows = floor_rows + list(core.rows)
    notes = floor_notes + list(core.notes)
    if not args.no_http:
        more, more_notes = http_rows()
        rows += more
        notes += more_notes

    text = common.table(rows)
    elapsed = time.perf_counter() - t0
    print()
    print(text)
    print()
    for n in notes:
        print("- " + n)
    if core.profiles:
        print()
        for name, prof in core.profiles.items():
            print(f"profile: {name}\n{prof}\n")
    if not args.no_write:
        write_results(info, started, elapsed, text, notes, core.profiles, quick=args.quick)
    return 0


def write_results(
    info: dict[str, str],
    started: str,
    elapsed: float,
    text: str,
    notes: list[str],
    profiles: dict[str, str],
    *,
    quick: bool,
) -> None:
    path = ROOT / "bench" / "RESULTS.md"
    analysis_marker = "<!-- analysis: kept across runs -->"
    analysis = ""
    if path.exists():
        old = path.read_text()
        if analysis_marker in old:
            analysis = old[old.index(analysis_marker) :]
    cmd = ".venv/bin/python bench/run.py" + (" --quick" if quick else "") + "   (make bench)"
    parts = [
        "# Benchmark results",
        "",
        f"Run {started}, {elapsed:.0f} s, command: `{cmd}`.",
        "",
        "Machine: " + "; ".join(f"{k} {v}" for k, v in info.items()) + ". A shared, noisy "
        "2-core VM: PostgreSQL, the load and the code under test share the same two cores.",
        "",
        "Ratio: the path's throughput over its ceiling's (times are inverted so that 1.00 is "
        '"as fast as the ceiling"); for the growth rows, time at 1M over time at 10k (1.00 is '
        "flat).",
        "",
        text,
        "",
        "Notes:",
        "",
        *[f"- {n}" for n in notes],
        "",
    ]
    if profiles:
        parts += ["## Profiles (cProfile, top entries by own time)", ""]
        for name, prof in profiles.items():
            parts += [f"### {name}", "", "```", prof, "```", ""]
    parts.append(analysis or analysis_marker + "\n")
    path.write_text("\n".join(parts))
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    raise SystemExit(main())
