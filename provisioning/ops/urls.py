"""Monitoring: /healthz and /metrics (no login; /metrics takes METRICS_TOKEN when one is set)."""

from django.urls import URLPattern, path

from provisioning.ops import views

urlpatterns: list[URLPattern] = [
    path("healthz", views.healthz, name="healthz"),
    path("metrics", views.metrics, name="metrics"),
]
