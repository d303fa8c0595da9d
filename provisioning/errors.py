"""Domain errors raised by services. The API's one exception handler maps them to HTTP answers.

Each carries a stable machine `code`, the HTTP status it maps to, and a message safe to show.
"""

from __future__ import annotations

from uuid import UUID

# What a customer reads when a new provision is refused while one is under way (kept word for word).
PROVISION_IN_PROGRESS_MESSAGE = (
    "A provisioning job is already in progress. Please wait for it to complete."
)


class ProvisioningError(Exception):
    code = "provisioning_error"
    status_code = 409

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class JobNotFound(ProvisioningError):
    code = "not_found"
    status_code = 404

    def __init__(self, job_id: UUID | str) -> None:
        super().__init__(f"No provisioning job {job_id}.")


class InvalidTransition(ProvisioningError):
    code = "invalid_transition"

    def __init__(self, *, job_id: UUID | str, current: str, wanted: str) -> None:
        super().__init__(f"Job {job_id} is {current}; it cannot become {wanted}.")
        self.current, self.wanted = current, wanted


class FencedOut(ProvisioningError):
    """A call from a run this job dispatched earlier (an older attempt or a re-sent dispatch)."""

    code = "fenced_out"

    def __init__(self, *, job_id: UUID | str, run_id: str, why: str) -> None:
        super().__init__(f"Run {run_id} no longer owns job {job_id}: {why}.")


class WrongRun(ProvisioningError):
    """A run that was never dispatched for this job."""

    code = "wrong_run"
    status_code = 403

    def __init__(self, *, job_id: UUID | str, run_id: str) -> None:
        super().__init__(f"Run {run_id} was never dispatched for job {job_id}.")


class CancelledByOurTeam(ProvisioningError):
    """The customer's "try again" on a build an operator stopped: that is support's decision."""

    code = "cancelled_by_operator"

    def __init__(self) -> None:
        super().__init__(
            "Our team stopped this build. Please contact support if you want it started again."
        )


class ReprovisionLimited(ProvisioningError):
    """Too many re-provisions of one agent within the hour (each makes a VM)."""

    code = "reprovision_limited"
    status_code = 429

    def __init__(self, *, limit: int) -> None:
        super().__init__(
            f"This agent was re-provisioned {limit} times in the last hour. "
            "Please wait a little, or contact support."
        )


class CleanupNotAllowed(ProvisioningError):
    """A cleanup run asked to delete the VMs of a job that is not a failed, claimed provision."""

    code = "cleanup_not_allowed"

    def __init__(self, *, job_id: UUID | str, why: str) -> None:
        super().__init__(f"Job {job_id} may not be cleaned up: {why}.")


class DispatchPending(ProvisioningError):
    """The run called before the dispatcher recorded its id: the runner retries shortly."""

    code = "dispatch_pending"

    def __init__(self, *, job_id: UUID | str) -> None:
        super().__init__(f"Job {job_id} is being dispatched; retry the claim in a few seconds.")


class UserBusy(ProvisioningError):
    code = "user_busy"

    def __init__(self, *, job_id: UUID | str) -> None:
        super().__init__(f"Job {job_id} cannot start: its customer already has a job provisioning.")


class ProvisionInProgress(ProvisioningError):
    code = "provision_in_progress"

    def __init__(self) -> None:
        super().__init__(PROVISION_IN_PROGRESS_MESSAGE)


class TokenReplayed(ProvisioningError):
    code = "token_replayed"

    def __init__(self) -> None:
        super().__init__("This token was already used; request a fresh one for every call.")


class AgentEnded(ProvisioningError):
    code = "agent_ended"

    def __init__(self) -> None:
        super().__init__("This agent has ended; it cannot be provisioned again.")


class IncompleteReport(ProvisioningError):
    """A provision reported done without the server it made."""

    code = "invalid"
    status_code = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
