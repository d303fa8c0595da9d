"""Strict serializer fields: JSON types as sent, no coercion ("3" is not an integer, 7 is not a
string), and the runner's step choices the callbacks accept."""

from __future__ import annotations

from typing import Any

from rest_framework import serializers

from provisioning.models import RUNNER_STEPS

# One named enum in the schema (settings.SPECTACULAR_SETTINGS["ENUM_NAME_OVERRIDES"]).
RUNNER_STEP_CHOICES = [(s.value, s.label) for s in RUNNER_STEPS]


class StrictIntegerField(serializers.IntegerField):
    default_error_messages = {"invalid": "A JSON integer is required."}

    def to_internal_value(self, data: Any) -> int:
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictCharField(serializers.CharField):
    default_error_messages = {"invalid": "A JSON string is required."}

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictIPv4Field(serializers.IPAddressField):
    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        if data == "" and self.allow_blank:
            return ""
        return super().to_internal_value(data)
