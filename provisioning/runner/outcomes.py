"""How a run ends: the process's exit codes and the exceptions that choose them.

Shared by the steps (which raise), the whole-pipeline functions and the CLI (which map them to
exit codes), so neither has to import the other just for these names.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_REFUSED = 3
EXIT_FENCED = 4
EXIT_KILLED = 137


class StepFailed(Exception):
    """A step could not do its work (the message is what operators read)."""


class Fenced(Exception):
    """The service says this run no longer owns the job."""


class ClaimRefused(Exception):
    """The service refused the claim: another run owns the job, or this one was never sent."""


class Cancelled(Exception):
    """The process was asked to stop (workflow cancelled, step timeout, local cancel)."""
