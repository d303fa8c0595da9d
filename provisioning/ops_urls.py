"""Monitoring: /healthz and /metrics (DESIGN.md "Users and their doors")."""

from django.urls import URLPattern, path

from provisioning import ops

urlpatterns: list[URLPattern] = [
    path("healthz", ops.healthz, name="healthz"),
    path("metrics", ops.metrics, name="metrics"),
]
