"""Password guessing is throttled on both login pages (django-axes): a user name or an address
with too many failures is locked out for the cool-off, even with the right password."""

from __future__ import annotations

import pytest
from django.urls import reverse

from tests.factories import UserFactory

PASSWORD = "correct horse battery staple"
LOGIN_PAGES = [reverse("login"), reverse("admin:login")]


def _login(client, url: str, username: str, password: str, address: str = "203.0.113.7"):
    # The customers' form (allauth) calls the field `login`; the admin's, `username`.
    field = "login" if url == reverse("login") else "username"
    return client.post(url, {field: username, "password": password}, REMOTE_ADDR=address)


@pytest.mark.parametrize("url", LOGIN_PAGES)
def test_the_right_password_is_refused_after_too_many_wrong_ones(db, client, settings, url):
    user = UserFactory(username="ada", is_staff=True)
    answers = [
        _login(client, url, user.username, "guess").status_code
        for _ in range(settings.AXES_FAILURE_LIMIT)
    ]
    # The form again for each wrong guess, until the last one allowed locks the account.
    assert answers == [200] * (settings.AXES_FAILURE_LIMIT - 1) + [429]

    locked = _login(client, url, user.username, PASSWORD)

    assert locked.status_code == 429
    assert "_auth_user_id" not in client.session


@pytest.mark.parametrize("url", LOGIN_PAGES)
def test_a_locked_user_name_is_locked_from_another_address_too(db, client, settings, url):
    user = UserFactory(username="ada", is_staff=True)
    for n in range(settings.AXES_FAILURE_LIMIT):
        _login(client, url, user.username, "guess", address=f"198.51.100.{n + 1}")

    assert _login(client, url, user.username, PASSWORD, address="192.0.2.99").status_code == 429


def test_a_guessing_address_is_locked_for_every_user_name(db, client, settings):
    UserFactory(username="grace")
    for n in range(settings.AXES_FAILURE_LIMIT):
        _login(client, reverse("login"), f"nobody{n}", "guess")

    assert _login(client, reverse("login"), "grace", PASSWORD).status_code == 429


def test_other_customers_still_log_in_while_one_is_locked(db, client, settings):
    UserFactory(username="ada")
    UserFactory(username="grace")
    for _ in range(settings.AXES_FAILURE_LIMIT):
        _login(client, reverse("login"), "ada", "guess", address="203.0.113.7")

    ok = _login(client, reverse("login"), "grace", PASSWORD, address="192.0.2.10")

    assert ok.status_code == 302
    assert client.session["_auth_user_id"]


def test_a_success_before_the_limit_forgets_the_failures(db, client, settings):
    UserFactory(username="ada")
    for _ in range(settings.AXES_FAILURE_LIMIT - 1):
        _login(client, reverse("login"), "ada", "guess")
    assert _login(client, reverse("login"), "ada", PASSWORD).status_code == 302
    client.logout()

    for _ in range(settings.AXES_FAILURE_LIMIT - 1):
        _login(client, reverse("login"), "ada", "guess")

    assert _login(client, reverse("login"), "ada", PASSWORD).status_code == 302


def test_a_forwarded_for_header_is_not_trusted_without_a_declared_proxy(db, client, settings):
    UserFactory(username="ada")
    for n in range(settings.AXES_FAILURE_LIMIT):
        client.post(
            reverse("login"),
            {"login": f"nobody{n}", "password": "guess"},
            REMOTE_ADDR="203.0.113.7",
            HTTP_X_FORWARDED_FOR=f"198.51.100.{n + 1}",  # a fresh spoofed address each time
        )

    assert _login(client, reverse("login"), "ada", PASSWORD).status_code == 429
