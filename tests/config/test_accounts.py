"""Customer accounts (django-allauth at /accounts/): sign-up, mandatory email confirmation, login
by user name or email, password reset by email, and axes' throttle on the customers' login."""

from __future__ import annotations

import re

import pytest
from allauth.account.models import EmailAddress
from django.contrib.auth import get_user_model
from django.core import mail
from django.urls import reverse

from tests.factories import UserFactory

pytestmark = pytest.mark.django_db

PASSWORD = "correct horse battery staple"
NEW_PASSWORD = "a brand new passphrase 42"


def link_in(message: mail.EmailMessage) -> str:
    """The one link in an email, as a path on this server."""
    (url,) = re.findall(r"https?://[^\s\"<>]+", message.body)
    return re.sub(r"^https?://[^/]+", "", url)


def sign_up(client, username: str = "grace", email: str = "grace@example.com"):
    return client.post(
        reverse("account_signup"),
        {"email": email, "username": username, "password1": PASSWORD, "password2": PASSWORD},
    )


def log_in(client, login: str, password: str = PASSWORD):
    return client.post(reverse("account_login"), {"login": login, "password": password})


def test_the_pages_render_in_the_dashboards_frame(client):
    for name in ("account_signup", "account_login", "account_reset_password"):
        page = client.get(reverse(name)).content.decode()
        assert 'href="/static/css/app.css"' in page
        assert "account-page" in page
    assert "Create an account" in client.get(reverse("account_signup")).content.decode()


def test_sign_up_sends_a_confirmation_and_logs_nobody_in(client):
    response = sign_up(client)

    assert response.status_code == 302
    assert response.url == reverse("account_email_verification_sent")
    user = get_user_model().objects.get(username="grace")
    assert user.email == "grace@example.com"
    assert not EmailAddress.objects.get(user=user).verified
    assert "_auth_user_id" not in client.session
    (message,) = mail.outbox
    assert message.to == ["grace@example.com"]
    assert message.subject.startswith("[Agent Cloud] ")
    assert "/accounts/confirm-email/" in link_in(message)


def test_an_unconfirmed_customer_cannot_log_in(client):
    sign_up(client)
    mail.outbox.clear()

    response = log_in(client, "grace")

    assert response.status_code == 302
    assert response.url == reverse("account_email_verification_sent")
    assert "_auth_user_id" not in client.session
    assert client.get(reverse("dashboard:agent-list")).status_code == 302
    # The link went out at sign-up; allauth resends it only after its cool-down (3 minutes).
    assert mail.outbox == []


@pytest.mark.parametrize("login", ["grace", "grace@example.com"])
def test_after_confirming_the_customer_logs_in_by_name_or_email(client, login):
    sign_up(client)
    confirm = link_in(mail.outbox[0])
    assert client.get(confirm).status_code == 200

    assert client.post(confirm).status_code == 302
    response = log_in(client, login)

    assert EmailAddress.objects.get(email="grace@example.com").verified
    assert response.status_code == 302
    assert response.url == "/agents/"
    assert client.get(reverse("dashboard:agent-list")).status_code == 200


def test_a_taken_email_or_user_name_is_refused_with_a_message(client):
    UserFactory(username="ada", email="ada@example.com")

    response = sign_up(client, username="ada", email="ada@example.com")

    assert response.status_code == 200
    page = response.content.decode()
    assert "field__error" in page
    assert get_user_model().objects.filter(username="ada").count() == 1
    assert mail.outbox == []


def test_password_reset_sends_a_working_link(client):
    UserFactory(username="ada", email="ada@example.com")

    response = client.post(reverse("account_reset_password"), {"email": "ada@example.com"})

    assert response.status_code == 302
    (message,) = mail.outbox
    assert message.to == ["ada@example.com"]
    form_url = client.get(link_in(message), follow=True).redirect_chain[-1][0]
    done = client.post(form_url, {"password1": NEW_PASSWORD, "password2": NEW_PASSWORD})
    assert done.status_code == 302
    assert log_in(client, "ada", PASSWORD).status_code == 200  # the old one no longer works
    assert log_in(client, "ada", NEW_PASSWORD).url == "/agents/"


def test_failed_logins_by_email_and_by_name_count_against_one_user(client, settings):
    UserFactory(username="ada", email="ada@example.com")
    for n in range(settings.AXES_FAILURE_LIMIT):
        login = "ada@example.com" if n % 2 else "ada"
        client.post(
            reverse("account_login"),
            {"login": login, "password": "guess"},
            REMOTE_ADDR=f"198.51.100.{n + 1}",
        )

    locked = client.post(
        reverse("account_login"),
        {"login": "ada", "password": PASSWORD},
        REMOTE_ADDR="192.0.2.50",
    )

    assert locked.status_code == 429
    assert "_auth_user_id" not in client.session
