"""The admin site operators use: the provisioning console first, Stripe's mirror tables last.

Django lists apps alphabetically, which put dj-stripe's ~45 models above the operator's console.
This site orders the apps by what an operator on call needs, and each app's models likewise.
Stripe's tables sit closed under one name (templates/admin/app_list.html); users without
dj-stripe's model permissions do not see them at all (Django's own rule).
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.contrib.admin.apps import AdminConfig
from django.http import HttpRequest

# Apps in this order; anything not named keeps its alphabetical place after them.
APP_ORDER = ["provisioning", "billing", "auth", "account", "axes"]
LAST_APPS = ["djstripe"]
MODEL_ORDER = {
    "provisioning": ["ProvisioningJob", "Agent", "JobEvent", "OperatorAlert"],
    "billing": ["UnfulfillablePayment", "UnmatchedEndingEvent"],
}


def _app_rank(app: dict[str, Any]) -> tuple[int, str]:
    label = app["app_label"]
    if label in APP_ORDER:
        return (0, f"{APP_ORDER.index(label):03d}")
    if label in LAST_APPS:
        return (2, label)
    return (1, str(app["name"]))


class OperatorAdminSite(admin.AdminSite):
    site_header = "Agent provisioning: operator console"
    site_title = "Operator console"
    index_title = "Jobs, agents and cases first"

    def get_app_list(
        self, request: HttpRequest, app_label: str | None = None
    ) -> list[dict[str, Any]]:
        apps = sorted(super().get_app_list(request, app_label), key=_app_rank)
        for app in apps:
            order = MODEL_ORDER.get(app["app_label"])
            if order:
                app["models"].sort(
                    key=lambda m: (
                        order.index(m["object_name"]) if m["object_name"] in order else len(order),
                        m["name"],
                    )
                )
            if app["app_label"] in LAST_APPS:
                app["name"] = "Stripe mirror (dj-stripe)"
                app["collapsed"] = True  # templates/admin/app_list.html: closed until opened
        return apps


class OperatorAdminConfig(AdminConfig):
    default_site = "config.admin.OperatorAdminSite"
