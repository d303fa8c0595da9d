"""Runner backends: how a job becomes a workflow run.

``get_backend()`` returns the one ``settings.PROVISIONING_RUNNER`` names (``local`` or
``github``), built once per process. Tests use ``set_backend(...)`` to install one wired to a
fake and ``reset_backend()`` to forget it.
"""

from __future__ import annotations

import threading

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from provisioning.backends.base import (
    MODES,
    BudgetSpent,
    DispatchError,
    DispatchResult,
    RunnerBackend,
    RunStatus,
    run_title,
)

__all__ = [
    "MODES",
    "BudgetSpent",
    "DispatchError",
    "DispatchResult",
    "RunStatus",
    "RunnerBackend",
    "get_backend",
    "reset_backend",
    "run_title",
    "set_backend",
]

_lock = threading.Lock()
_backend: RunnerBackend | None = None


def _build(name: str) -> RunnerBackend:
    if name == "github":
        from provisioning.backends.github import GitHubBackend

        return GitHubBackend.from_settings()
    if name == "local":
        from provisioning.backends.local import LocalBackend

        return LocalBackend()
    raise ImproperlyConfigured(f"PROVISIONING_RUNNER must be 'local' or 'github', not {name!r}")


def get_backend() -> RunnerBackend:
    """The configured backend, cached per process."""
    global _backend
    with _lock:
        if _backend is None:
            _backend = _build(settings.PROVISIONING_RUNNER)
        return _backend


def set_backend(backend: RunnerBackend | None) -> None:
    """Install ``backend`` as the process's backend (tests); None forgets it."""
    global _backend
    with _lock:
        _backend = backend


def reset_backend() -> None:
    """Forget the cached backend so the next ``get_backend()`` reads settings again."""
    set_backend(None)
