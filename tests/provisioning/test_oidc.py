import time
from datetime import UTC, datetime

import jwt
import pytest

from provisioning.api import oidc
from provisioning.api.oidc import RunIdentity, TokenInvalid, verify_run_token
from tests.fakes.oidc import running_issuer


@pytest.fixture
def oidc_issuer(settings):
    yield from running_issuer(settings)


def refusal(token: str, **kwargs) -> str:
    with pytest.raises(TokenInvalid) as excinfo:
        verify_run_token(token, **kwargs)
    return excinfo.value.reason


def test_a_token_from_our_workflow_run_gives_the_run_identity(oidc_issuer, settings):
    token = oidc_issuer.mint(run_id="17000000001", run_attempt=2, jti="jti-1", actor_id="77")

    identity = verify_run_token(token)

    assert isinstance(identity, RunIdentity)
    assert identity.run_id == "17000000001"
    assert identity.run_attempt == 2
    assert identity.jti == "jti-1"
    assert identity.actor_id == "77"
    assert identity.repository == settings.GITHUB_REPOSITORY
    assert identity.workflow_ref == (
        f"{settings.GITHUB_REPOSITORY}/.github/workflows/{settings.GITHUB_WORKFLOW_FILE}"
        f"@refs/heads/{settings.GITHUB_REF}"
    )
    assert identity.expires_at.tzinfo is UTC
    assert identity.expires_at > datetime.now(UTC)


def test_a_token_fetched_over_http_like_the_runner_does_is_accepted(oidc_issuer):
    import httpx

    response = httpx.get(
        oidc_issuer.token_request_url(run_id="5", run_attempt=1)
        + f"&audience={oidc_issuer.audience}",
        headers={"Authorization": f"bearer {oidc_issuer.request_token}"},
    )

    assert verify_run_token(response.json()["value"]).run_id == "5"


def test_the_issuer_refuses_a_token_request_without_the_request_token(oidc_issuer):
    import httpx

    response = httpx.get(oidc_issuer.token_request_url(run_id="5"))

    assert response.status_code == 401


def test_a_token_signed_by_another_key_has_a_bad_signature(oidc_issuer):
    impostor = oidc_issuer.add_key(publish=False)

    assert refusal(oidc_issuer.mint(sign_with=impostor)) == "bad signature"


def test_a_symmetric_token_is_refused_as_a_bad_signature(oidc_issuer):
    token = jwt.encode(
        oidc_issuer.claims(), "not-a-key-" * 4, algorithm="HS256", headers={"kid": "x"}
    )

    assert refusal(token) == "bad signature"


def test_garbage_is_a_malformed_token(oidc_issuer):
    assert refusal("not.a.jwt") == "malformed token"


def test_an_expired_token_is_refused(oidc_issuer):
    now = int(time.time())

    assert refusal(oidc_issuer.mint(iat=now - 400, nbf=now - 400, exp=now - 31)) == "expired"


def test_a_token_just_past_expiry_is_within_the_leeway(oidc_issuer):
    now = int(time.time())

    assert verify_run_token(oidc_issuer.mint(iat=now - 300, nbf=now - 300, exp=now - 10))


def test_a_token_for_another_audience_is_refused(oidc_issuer):
    assert refusal(oidc_issuer.mint(aud="https://github.com/someone")) == "wrong audience"


def test_a_token_from_another_issuer_is_refused(oidc_issuer):
    assert refusal(oidc_issuer.mint(iss="https://evil.example")) == "wrong issuer"


def test_a_token_from_another_repository_is_refused(oidc_issuer):
    assert refusal(oidc_issuer.mint(repository_id="999")) == "wrong repository"


def test_a_token_from_another_workflow_is_refused(oidc_issuer, settings):
    other = (
        f"{settings.GITHUB_REPOSITORY}/.github/workflows/ci.yml@refs/heads/{settings.GITHUB_REF}"
    )

    assert refusal(oidc_issuer.mint(workflow_ref=other)) == "wrong workflow"


def test_our_workflow_file_from_another_branch_is_refused(oidc_issuer, settings):
    other = f"{settings.GITHUB_REPOSITORY}/.github/workflows/{settings.GITHUB_WORKFLOW_FILE}@refs/heads/evil"

    assert refusal(oidc_issuer.mint(workflow_ref=other)) == "wrong workflow"


def test_the_repository_in_workflow_ref_is_compared_without_case(oidc_issuer, settings):
    """GitHub writes the repository's canonical case; the setting may be typed in another."""
    canonical = "Example-Org/Agent-Provisioning"
    settings.GITHUB_REPOSITORY = canonical.lower()
    ref = f"{canonical}/.github/workflows/{settings.GITHUB_WORKFLOW_FILE}@refs/heads/main"

    identity = verify_run_token(oidc_issuer.mint(workflow_ref=ref, repository=canonical))

    assert identity.run_id


def test_the_workflow_file_and_branch_in_workflow_ref_keep_their_case(oidc_issuer, settings):
    repo = settings.GITHUB_REPOSITORY
    for other in (
        f"{repo}/.github/workflows/{settings.GITHUB_WORKFLOW_FILE.upper()}@refs/heads/main",
        f"{repo}/.github/workflows/{settings.GITHUB_WORKFLOW_FILE}@refs/heads/MAIN",
        f"{repo}x/.github/workflows/{settings.GITHUB_WORKFLOW_FILE}@refs/heads/main",
    ):
        assert refusal(oidc_issuer.mint(workflow_ref=other)) == "wrong workflow", other


def test_the_ref_may_be_given_per_call(oidc_issuer, settings):
    repo, workflow = settings.GITHUB_REPOSITORY, settings.GITHUB_WORKFLOW_FILE
    token = oidc_issuer.mint(
        ref="refs/heads/trunk", workflow_ref=f"{repo}/.github/workflows/{workflow}@refs/heads/trunk"
    )

    assert refusal(token) == "wrong workflow"
    assert verify_run_token(token, ref="trunk").run_id


def test_a_token_for_another_ref_is_refused(oidc_issuer):
    assert refusal(oidc_issuer.mint(ref="refs/heads/feature")) == "wrong ref"


def test_a_token_from_another_event_is_refused(oidc_issuer):
    assert refusal(oidc_issuer.mint(event_name="push")) == "wrong event"


def test_allowed_events_is_a_parameter(oidc_issuer):
    token = oidc_issuer.mint(event_name="schedule")

    assert refusal(token) == "wrong event"
    assert verify_run_token(token, allowed_events=("schedule",)).run_id == "1"


def test_a_self_hosted_runner_is_refused(oidc_issuer):
    assert refusal(oidc_issuer.mint(runner_environment="self-hosted")) == "wrong runner environment"


def test_allowed_runner_environments_come_from_settings(oidc_issuer, settings):
    settings.PROVISIONING_OIDC_RUNNER_ENVIRONMENTS = ["github-hosted", "self-hosted"]

    assert verify_run_token(oidc_issuer.mint(runner_environment="self-hosted"))


@pytest.mark.parametrize("claim", ["jti", "exp", "iat", "aud", "iss"])
def test_a_token_missing_a_required_claim_is_refused(oidc_issuer, claim):
    assert refusal(oidc_issuer.mint(**{claim: None})) == f"missing claim {claim}"


@pytest.mark.parametrize("claim", ["run_id", "repository_id", "event_name"])
def test_a_token_missing_a_run_claim_is_refused(oidc_issuer, claim):
    assert refusal(oidc_issuer.mint(**{claim: None})) == f"missing claim {claim}"


def test_sub_is_not_parsed(oidc_issuer):
    assert verify_run_token(oidc_issuer.mint(sub="repo:anything:at-all"))


def test_a_rotated_key_is_fetched_on_its_first_use(oidc_issuer):
    verify_run_token(oidc_issuer.mint())  # caches the key set with the old key only
    oidc_issuer.rotate_key()

    assert verify_run_token(oidc_issuer.mint(run_id="2")).run_id == "2"


def test_a_kid_still_unknown_after_the_refresh_is_refused(oidc_issuer):
    verify_run_token(oidc_issuer.mint())
    unpublished = oidc_issuer.add_key(publish=False)

    assert refusal(oidc_issuer.mint(kid=unpublished)) == "unknown key"


def test_the_key_set_is_cached_between_verifications(oidc_issuer, settings):
    verify_run_token(oidc_issuer.mint())
    oidc_issuer.unpublish_key(oidc_issuer.active_kid)

    assert verify_run_token(oidc_issuer.mint(run_id="3")).run_id == "3"


def test_an_unknown_kid_within_the_refresh_cooldown_is_refused(oidc_issuer, settings):
    settings.PROVISIONING_OIDC_JWKS_REFRESH_COOLDOWN_SECONDS = 60
    verify_run_token(oidc_issuer.mint())
    oidc_issuer.rotate_key()

    assert refusal(oidc_issuer.mint()) == "unknown key"


def test_an_unreachable_key_set_refuses_the_token(oidc_issuer, settings):
    settings.PROVISIONING_OIDC_JWKS_URL = "http://127.0.0.1:9/.well-known/jwks"

    assert refusal(oidc_issuer.mint()) == "key set unavailable"


def test_a_key_set_file_works_and_is_reread_for_an_unknown_kid(oidc_issuer, settings, tmp_path):
    jwks_file = oidc_issuer.write_jwks(tmp_path / "jwks.json")
    settings.PROVISIONING_OIDC_JWKS_URL = str(jwks_file)
    assert verify_run_token(oidc_issuer.mint()).run_id == "1"

    oidc_issuer.rotate_key()
    oidc_issuer.write_jwks(jwks_file)

    assert verify_run_token(oidc_issuer.mint(run_id="9")).run_id == "9"


def test_a_missing_key_set_file_refuses_the_token(oidc_issuer, settings, tmp_path):
    settings.PROVISIONING_OIDC_JWKS_URL = str(tmp_path / "absent.json")

    assert refusal(oidc_issuer.mint()) == "key set unavailable"


def test_verifiers_are_cached_per_key_source(oidc_issuer, settings):
    verify_run_token(oidc_issuer.mint())
    first = oidc.jwk_client(settings.PROVISIONING_OIDC_JWKS_URL)

    verify_run_token(oidc_issuer.mint())

    assert oidc.jwk_client(settings.PROVISIONING_OIDC_JWKS_URL) is first
