"""Browser tests: Playwright driving the system Chromium against pytest-django's live server.

Fixtures for every browser test here:

- `browser`  a Chromium instance for one test (function-scoped on purpose: Playwright's sync API
             keeps an event loop running in the main thread while it lives, and Django refuses ORM
             calls from a thread with a running loop, so a session-long browser would break the
             database setup of every later test);
- `page`     a fresh context and page whose relative URLs resolve against `live_server`;
- `login`    `login(username, password=PASSWORD, path="/admin/login/")`: logs in through a Django
             login form (the admin's, or `/accounts/login/`) and waits for the redirect.

Use them with `@pytest.mark.browser` and `@pytest.mark.django_db(transaction=True)` (the live
server thread must see the test's rows). Without /usr/bin/chromium every browser test is skipped
with the reason below, so `make test` passes in a fresh clone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
PASSWORD = "correct horse battery staple"  # tests.factories.UserFactory's password
DEFAULT_TIMEOUT_MS = 15_000


def chromium_missing_reason() -> str | None:
    if CHROMIUM.exists():
        return None
    return (
        f"Chromium is not installed at {CHROMIUM}: browser tests need the system Chromium "
        "(Debian: apt-get install -y chromium chromium-driver; .ci/run installs it)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = chromium_missing_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "browser" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def browser(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    reason = chromium_missing_reason()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    # The test's own ORM calls while Playwright's loop runs are plain synchronous code.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Any, live_server: Any) -> Iterator[Any]:
    context = browser.new_context(base_url=live_server.url)
    context.set_default_timeout(DEFAULT_TIMEOUT_MS)
    try:
        yield context.new_page()
    finally:
        context.close()


@pytest.fixture
def login(page: Any) -> Callable[..., None]:
    def log_in(username: str, password: str = PASSWORD, path: str = "/admin/login/") -> None:
        page.goto(path)
        # The admin's form names the field `username`; the customers' (allauth), `login`.
        page.locator("#id_username, #id_login").fill(username)
        page.locator("#id_password").fill(password)
        page.locator("#id_password").press("Enter")
        page.wait_for_load_state()
        if page.locator("#id_password").count() and "login" in page.url:
            raise AssertionError(f"login as {username} failed at {page.url}")

    return log_in
