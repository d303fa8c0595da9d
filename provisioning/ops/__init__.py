"""Monitoring doors: /healthz and /metrics."""
