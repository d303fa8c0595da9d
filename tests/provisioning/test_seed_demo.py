"""`manage.py seed_demo`: the demo logins `make run` prints, idempotent, DEBUG only."""

from __future__ import annotations

from io import StringIO

import pytest
from django.contrib.auth import authenticate, get_user_model
from django.core.management import CommandError, call_command
from django.test import RequestFactory

from provisioning.management.commands.seed_demo import DEMO_CUSTOMER, DEMO_OPERATOR

pytestmark = pytest.mark.django_db


def seed() -> str:
    out = StringIO()
    call_command("seed_demo", stdout=out)
    return out.getvalue()


def test_creates_operator_and_customer_with_the_printed_logins(settings):
    settings.DEBUG = True
    settings.PUBLIC_BASE_URL = "http://127.0.0.1:8000"

    output = seed()

    User = get_user_model()
    operator = User.objects.get(username=DEMO_OPERATOR.username)
    customer = User.objects.get(username=DEMO_CUSTOMER.username)
    assert operator.is_staff and operator.is_superuser and operator.is_active
    assert not customer.is_staff and not customer.is_superuser and customer.is_active
    for login in (DEMO_OPERATOR, DEMO_CUSTOMER):
        request = RequestFactory().post("/accounts/login/")  # the login throttle needs one
        assert authenticate(request, username=login.username, password=login.password) is not None
        assert login.username in output and login.password in output
    assert "http://127.0.0.1:8000/accounts/login/" in output
    assert "http://127.0.0.1:8000/admin/" in output
    assert "http://127.0.0.1:8000/agents/" in output


def test_is_idempotent_and_repairs_changed_demo_users(settings):
    settings.DEBUG = True
    seed()
    User = get_user_model()
    customer = User.objects.get(username=DEMO_CUSTOMER.username)
    customer.set_password("someone changed it")
    customer.is_staff = True
    customer.save()
    User.objects.filter(username=DEMO_OPERATOR.username).update(is_superuser=False)

    output = seed()

    assert "ready" in output and "created" not in output
    assert User.objects.filter(username__in=["operator", "demo"]).count() == 2
    assert User.objects.count() == 2
    customer.refresh_from_db()
    assert not customer.is_staff
    assert customer.check_password(DEMO_CUSTOMER.password)
    assert User.objects.get(username=DEMO_OPERATOR.username).is_superuser


def test_keeps_an_existing_password_hash_when_it_already_matches(settings):
    settings.DEBUG = True
    seed()
    User = get_user_model()
    before = User.objects.get(username=DEMO_OPERATOR.username).password
    seed()
    assert User.objects.get(username=DEMO_OPERATOR.username).password == before


def test_refuses_without_debug(settings):
    settings.DEBUG = False
    with pytest.raises(CommandError, match="DJANGO_DEBUG=1"):
        seed()
    assert not get_user_model().objects.exists()
