"""The dashboard's "Buy an agent" form: a name and a region, then off to Checkout."""

from __future__ import annotations

from django import forms
from django.core.validators import RegexValidator

from provisioning.models import Region

# Letters (any script), digits, spaces, hyphens and underscores: the name shows up in the
# dashboard and in the server's label, so nothing that needs escaping or quoting.
agent_name_validator = RegexValidator(
    regex=r"^[\w\- ]+\Z",
    message="Use letters, digits, spaces, hyphens (-) and underscores (_) only.",
)


class AgentBuyForm(forms.Form):
    name = forms.CharField(
        label="Agent name",
        min_length=1,
        max_length=64,
        validators=[agent_name_validator],
        help_text="Up to 64 characters: letters, digits, spaces, - and _.",
        widget=forms.TextInput(attrs={"autocomplete": "off", "autofocus": True}),
    )
    region = forms.ChoiceField(label="Region", choices=Region.choices, initial=Region.US_EAST)
