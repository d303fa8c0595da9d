"""Which database `make test` uses: prints a PostgreSQL URL on stdout, or nothing for SQLite.

- DATABASE_URL set: that one (for PostgreSQL, its database is created if missing);
- else PostgreSQL at 127.0.0.1:5432 if one answers: DEFAULT_URL, created if missing;
- else nothing: the suite runs on SQLite and its last line says what was skipped.

`makemigrations --check` connects to the database itself, so it has to exist; the test
databases pytest-django builds (`test_<name>`) are created by pytest-django.
"""

from __future__ import annotations

import contextlib
import os
import sys
from urllib.parse import urlsplit, urlunsplit

DEFAULT_URL = "postgres://postgres@127.0.0.1:5432/agent_provisioning_test"
CONNECT_TIMEOUT_SECONDS = 3


def _is_postgres(url: str) -> bool:
    return urlsplit(url).scheme in {"postgres", "postgresql", "pgsql", "postgis"}


def redacted(url: str) -> str:
    """The URL without its password (SQLite URLs have none)."""
    if not _is_postgres(url):
        return url
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}@" if parts.username else ""
    return urlunsplit((parts.scheme, f"{user}{host}", parts.path, "", ""))


def ensure_database(url: str) -> None:
    """Create the URL's database unless it exists (connecting to the server's `postgres` db)."""
    import psycopg
    from psycopg import sql

    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    maintenance = urlunsplit((parts.scheme, parts.netloc, "/postgres", parts.query, ""))
    with psycopg.connect(
        maintenance, autocommit=True, connect_timeout=CONNECT_TIMEOUT_SECONDS
    ) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
            return
        # A concurrent run may have created it meanwhile.
        with contextlib.suppress(psycopg.errors.DuplicateDatabase):
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def answers(url: str) -> bool:
    import psycopg

    parts = urlsplit(url)
    maintenance = urlunsplit((parts.scheme, parts.netloc, "/postgres", parts.query, ""))
    try:
        psycopg.connect(maintenance, connect_timeout=CONNECT_TIMEOUT_SECONDS).close()
    except psycopg.OperationalError:
        return False
    return True


def main() -> int:
    url = os.environ.get("DATABASE_URL", "")
    if url:
        if _is_postgres(url):
            ensure_database(url)
        print(f"make test: DATABASE_URL {redacted(url)}", file=sys.stderr)
        print(url)
        return 0
    if answers(DEFAULT_URL):
        ensure_database(DEFAULT_URL)
        print(f"make test: PostgreSQL answers, using {redacted(DEFAULT_URL)}", file=sys.stderr)
        print(DEFAULT_URL)
        return 0
    print(
        "make test: no DATABASE_URL and no PostgreSQL at 127.0.0.1:5432: using SQLite "
        "(tests that need PostgreSQL are skipped)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
