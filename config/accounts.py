"""Customer accounts: what django-axes needs to know about allauth's login form, and the form's
labels.

The admin's login form posts `username`; allauth's posts `login` (a user name or an email address)
and hands the backends `username=` or `email=`. Axes counts failures per user name, so both forms
must name the same one: an email address is read as the user name of the account it belongs to,
whichever form it came through.
"""

from __future__ import annotations

from typing import Any

from allauth.account import forms as allauth_forms
from django.contrib.auth import get_user_model
from django.http import HttpRequest


def axes_username(request: HttpRequest, credentials: dict[str, Any] | None) -> str:
    """The user name a login attempt is about (AXES_USERNAME_CALLABLE)."""
    given = ""
    for key in ("username", "email", "login"):
        value = (credentials or {}).get(key)
        if isinstance(value, str) and value:
            given = value
            break
    if not given:
        data = getattr(request, "POST", {})
        given = str(data.get("login") or data.get("username") or "")
    given = given.strip()
    if "@" in given:
        user_model = get_user_model()
        owner = (
            user_model._default_manager.filter(email__iexact=given)
            .values_list(user_model.USERNAME_FIELD, flat=True)
            .first()
        )
        if owner:
            return str(owner)
    return given


class LoginForm(allauth_forms.LoginForm):  # type: ignore[misc]
    """allauth's login form, labelled in the dashboard's words (allauth says "Login")."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["login"].label = "Username or email"
        if "remember" in self.fields:
            self.fields["remember"].label = "Keep me logged in on this device"
