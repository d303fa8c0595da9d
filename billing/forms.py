"""The dashboard's "Buy an agent" form: a name and a region, then off to Checkout."""

from __future__ import annotations

from django import forms

from billing import services
from provisioning.models import Region


class AgentBuyForm(forms.Form):
    name = forms.CharField(
        label="Agent name",
        min_length=1,
        max_length=services.AGENT_NAME_MAX_CHARS,
        help_text="Up to 64 characters: letters, digits, spaces, - and _.",
        widget=forms.TextInput(attrs={"autocomplete": "off", "autofocus": True}),
    )
    region = forms.ChoiceField(label="Region", choices=Region.choices, initial=Region.US_EAST)

    def clean_name(self) -> str:
        # The same rule fulfilment applies to the paid session's metadata.
        try:
            return services.agent_name_clean(self.cleaned_data["name"])
        except services.PurchaseInvalid:
            raise forms.ValidationError(
                services.AGENT_NAME_RULE[0].upper() + services.AGENT_NAME_RULE[1:] + "."
            ) from None
