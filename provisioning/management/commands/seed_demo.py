"""`manage.py seed_demo`: the two logins `make run` prints, for local development only.

Idempotent: every run leaves exactly one demo operator (staff + superuser) and one demo customer,
each with the fixed password below (reset if someone changed it). Refuses unless DEBUG is on:
fixed, published passwords must never reach a real database.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from allauth.account.models import EmailAddress
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

if TYPE_CHECKING:
    from django.contrib.auth.models import User  # the AUTH_USER_MODEL


@dataclass(frozen=True)
class DemoLogin:
    username: str
    password: str
    email: str
    operator: bool


# Published on purpose (README, `make run`'s banner): local development only.
DEMO_OPERATOR = DemoLogin("operator", "operator-local-only", "operator@example.test", True)
DEMO_CUSTOMER = DemoLogin("demo", "demo-local-only", "demo@example.test", False)
DEMO_LOGINS = (DEMO_OPERATOR, DEMO_CUSTOMER)


def ensure_demo_user(login: DemoLogin) -> tuple[User, bool]:
    """Create or repair one demo user; returns (user, created)."""
    user_model = get_user_model()
    user, created = user_model._default_manager.get_or_create(
        **{user_model.USERNAME_FIELD: login.username}, defaults={"email": login.email}
    )
    user.email = user.email or login.email
    user.is_active = True
    user.is_staff = login.operator
    user.is_superuser = login.operator
    if created or not user.check_password(login.password):
        user.set_password(login.password)
    user.save()
    # Its address counts as confirmed: allauth lets nobody log in before that.
    EmailAddress.objects.update_or_create(
        user=user, email=user.email, defaults={"verified": True, "primary": True}
    )
    return user, created


def demo_urls(base_url: str | None = None) -> dict[str, str]:
    base = (base_url or settings.PUBLIC_BASE_URL).rstrip("/")
    return {
        "dashboard": f"{base}/agents/",
        "login": f"{base}/accounts/login/",
        "admin": f"{base}/admin/",
        "api docs": f"{base}/api/docs/",
    }


class Command(BaseCommand):
    help = "Create (or repair) the demo operator and demo customer logins. DEBUG only."

    def handle(self, *args: Any, **options: Any) -> None:
        if not settings.DEBUG:
            raise CommandError(
                "seed_demo creates users with published passwords; it runs only with "
                "DJANGO_DEBUG=1 (local development, e.g. `make run`)."
            )
        with transaction.atomic():
            results = [(login, *ensure_demo_user(login)) for login in DEMO_LOGINS]
        for login, _user, created in results:
            role = "operator (staff, superuser)" if login.operator else "customer"
            verb = "created" if created else "ready"
            self.stdout.write(
                f"demo {role} {verb}: username {login.username!r}, password {login.password!r}"
            )
        urls = demo_urls()
        self.stdout.write(
            f"log in at {urls['login']}: customers see {urls['dashboard']}, "
            f"operators {urls['admin']}"
        )
