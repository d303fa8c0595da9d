"""The API's JSON parser refuses bodies nested past any real request with 400 (it answered 500)."""

from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from provisioning.api.parsers import MAX_NESTING, nesting_depth
from provisioning.models import JobEvent, ProvisioningJob
from tests.fakes.oidc import bearer
from tests.provisioning.helpers import claimed

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 50_000,
        b'{"step":' * 50_000,
        b'{"step": "configure", "x": ' + b"[" * (MAX_NESTING + 5) + b"]" * (MAX_NESTING + 5) + b"}",
    ],
    ids=["deep-array", "deep-object", "past-the-limit"],
)
def test_a_deeply_nested_body_is_a_400_and_changes_nothing(oidc_issuer, backend, body):
    job, run = claimed(backend)
    before = (ProvisioningJob.objects.values().get(pk=job.pk), JobEvent.objects.count())

    answer = APIClient().post(
        f"/api/v1/jobs/{job.pk}/heartbeat",
        data=body,
        content_type="application/json",
        **bearer(oidc_issuer.mint(run_id=run.run_id)),
    )

    assert answer.status_code == 400
    assert "nested deeper" in answer.json()["errors"]["non_field_errors"][0]
    assert (ProvisioningJob.objects.values().get(pk=job.pk), JobEvent.objects.count()) == before


def test_an_ordinary_body_still_parses(oidc_issuer, backend):
    job, run = claimed(backend)

    answer = APIClient().post(
        f"/api/v1/jobs/{job.pk}/heartbeat",
        {"step": "configure", "progress": 40},
        format="json",
        **bearer(oidc_issuer.mint(run_id=run.run_id)),
    )

    assert answer.status_code == 200


@pytest.mark.parametrize(
    ("value", "depth"),
    [(1, 0), ([], 1), ({"a": [1, {"b": []}]}, 4), ([[[]], []], 3)],
)
def test_nesting_depth_counts_containers(value, depth):
    assert nesting_depth(value) == depth
