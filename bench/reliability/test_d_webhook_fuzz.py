"""10,000 generated malformed, forged and stale webhook bodies -> all 4xx, no agent or job.

Through Django's test Client in this process, against the real webhook URL and the endpoint row
the stack set up (same database), so nothing but the request itself varies.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter

from django.test import Client
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.reliability import checks
from bench.reliability.conftest import figure, knob
from bench.reliability.stack import WEBHOOK_SECRET, WEBHOOK_UUID

PATH = f"/stripe/webhook/{WEBHOOK_UUID}/"
N = knob("RELIABILITY_FUZZ_EXAMPLES", 10_000)
# A time budget for the requests: past it, examples are still generated but not sent (and the
# figures say how many were sent), so a loaded machine cannot push the suite past 15 minutes.
BUDGET_SECONDS = knob("RELIABILITY_FUZZ_SECONDS", 150)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
any_header = st.one_of(
    st.none(),
    st.text(max_size=80),
    st.builds(
        lambda t, h: f"t={t},v1={h}",
        st.integers(-(10**10), 10**10),
        st.text("0123456789abcdef", min_size=0, max_size=70),
    ),
)


def _counts() -> tuple[int, int, int]:
    from billing.models import UnfulfillablePayment
    from provisioning.models import Agent, ProvisioningJob

    return (
        Agent.objects.count(),
        ProvisioningJob.objects.count(),
        UnfulfillablePayment.objects.count(),
    )


def test_malformed_forged_and_stale_webhooks_are_refused(stack, make_users):
    (user,) = make_users("fuzz", 1)
    client = Client(raise_request_exception=False)
    statuses: Counter[int] = Counter()
    kinds: Counter[str] = Counter()
    bad: list[tuple[str, int, bytes, str | None]] = []

    def real_event(name: str, region: str) -> dict:
        return checks.checkout_event(user, name or "x", region)

    events = st.builds(
        real_event, st.text(max_size=70), st.sampled_from(["us-east", "eu-central", "mars"])
    )

    def malformed(draw_body: bytes, header: str | None) -> tuple[str, bytes, str | None]:
        return "malformed", draw_body, header

    def json_junk(value: object, header: str | None) -> tuple[str, bytes, str | None]:
        return "json junk", json.dumps(value).encode(), header

    def forged(event: dict, secret: str) -> tuple[str, bytes, str | None]:
        body = checks.encode(event)
        return "forged", body, checks.sign(body, secret=secret or "x")

    def stale(event: dict, age: int) -> tuple[str, bytes, str | None]:
        body = checks.encode(event)
        return "stale", body, checks.sign(body, timestamp=int(time.time()) - age)

    def tampered(event: dict, name: str) -> tuple[str, bytes, str | None]:
        body = checks.encode(event)
        header = checks.sign(body)
        metadata = event["data"]["object"]["metadata"]
        changed = name + "!"
        metadata["agent_name"] = changed if changed != metadata["agent_name"] else changed + "!"
        return "tampered", checks.encode(event), header

    def wrong_scheme(event: dict, scheme: str) -> tuple[str, bytes, str | None]:
        body = checks.encode(event)
        good = checks.sign(body)
        return "wrong scheme", body, good.replace("v1=", f"{scheme}=")

    cases = st.one_of(
        st.builds(malformed, st.binary(max_size=400), any_header),
        st.builds(json_junk, json_values, any_header),
        st.builds(forged, events, st.text(max_size=40).filter(lambda s: s != WEBHOOK_SECRET)),
        st.builds(stale, events, st.integers(min_value=301, max_value=10**8)),
        st.builds(tampered, events, st.text(max_size=20)),
        st.builds(wrong_scheme, events, st.sampled_from(["v0", "V1", "v2", "v1 ", "sig"])),
    )

    before = _counts()
    # dj-stripe logs every refusal with a traceback: 10,000 of them cost more than the requests.
    quiet = {name: logging.getLogger(name).level for name in ("djstripe", "django.request")}
    for name in quiet:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    t0 = time.monotonic()

    @settings(
        max_examples=N,
        deadline=None,
        database=None,
        derandomize=False,
        suppress_health_check=list(HealthCheck),
    )
    @given(cases)
    def deliver(case: tuple[str, bytes, str | None]) -> None:
        kind, body, header = case
        if time.monotonic() - t0 > BUDGET_SECONDS:
            kinds["not sent (time budget)"] += 1
            return
        extra = {} if header is None else {"HTTP_STRIPE_SIGNATURE": header}
        response = client.post(PATH, data=body, content_type="application/json", **extra)
        statuses[response.status_code] += 1
        kinds[kind] += 1
        if not 400 <= response.status_code < 500:
            bad.append((kind, response.status_code, body[:200], header))

    try:
        deliver()
    finally:
        for name, level in quiet.items():
            logging.getLogger(name).setLevel(level)
    took = time.monotonic() - t0
    after = _counts()
    figure(
        f"[fuzz] {sum(statuses.values())} of {N} webhook bodies sent in {took:.0f}s: kinds {dict(kinds)}; "
        f"responses {dict(sorted(statuses.items()))}; not 4xx {len(bad)}; agents/jobs/"
        f"unfulfillable before {before} after {after}"
    )
    for kind, code, body, header in bad[:5]:
        figure(f"[fuzz]   {kind} -> {code}: body {body!r} header {header!r}")
    assert not bad
    assert after == before
