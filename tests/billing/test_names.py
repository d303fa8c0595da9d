"""One name policy: the buy form accepts exactly the names fulfilment accepts, and names outside
the Basic Multilingual Plane are fine for both."""

from __future__ import annotations

import pytest

from billing import services
from billing.forms import AgentBuyForm

NAMES = [
    "research-bot",
    "my agent_2",
    "\U0001d400gent",  # mathematical bold A
    "\U00020000 bot",  # a CJK ideograph outside the BMP
    "café",
    "my<agent>",
    "drop; table",
    "{{ 7 * 7 }}",
    "tab\there",
    "x" * 64,
    "x" * 65,
    "   ",
]


def _fulfilment_accepts(name: str) -> bool:
    try:
        services.agent_name_clean(name)
    except services.PurchaseInvalid:
        return False
    return True


@pytest.mark.parametrize("name", NAMES)
def test_the_form_and_fulfilment_accept_the_same_names(name):
    form = AgentBuyForm(data={"name": name, "region": "us-east"})

    assert form.is_valid() == _fulfilment_accepts(name), form.errors


@pytest.mark.parametrize("name", ["\U0001d400gent", "\U00020000 bot"])
def test_names_outside_the_basic_multilingual_plane_are_accepted(name):
    assert services.agent_name_clean(name) == name
