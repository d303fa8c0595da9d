"""One exception handler for the whole API: every refusal is `{"detail", "code"}` (+ `errors`).

- Domain errors (provisioning.errors) carry their own code and status (404/403/409).
- Bad bodies, including JSON that does not parse, are 400 `{"detail", "code": "invalid",
  "errors": {field: [messages]}}`.
- Everything else DRF raises keeps its status and headers (401's `WWW-Authenticate`, 405's
  `Allow`, 429's `Retry-After`) with its body reshaped to `{"detail", "code"}`.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.http import Http404
from rest_framework import exceptions, serializers, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from provisioning.errors import ProvisioningError

INVALID_BODY = "The request body is invalid."


# --- the shapes, for the schema (the handler below writes them) ---------------------------------


class ErrorSerializer(serializers.Serializer[Any]):
    detail = serializers.CharField()
    code = serializers.CharField(help_text="Stable machine-readable reason, e.g. fenced_out.")

    class Meta:
        ref_name = "Error"


class ValidationErrorSerializer(ErrorSerializer):
    # The JSON key is `errors`. DRF's metaclass moves declared fields off the class, so this only
    # shadows Serializer.errors for the type checker.
    errors = serializers.DictField(  # type: ignore[assignment]
        child=serializers.ListField(child=serializers.CharField()),
        help_text="Field name (or non_field_errors) to its messages.",
    )

    class Meta:
        ref_name = "ValidationError"


# --- the handler (settings.REST_FRAMEWORK["EXCEPTION_HANDLER"]) ---------------------------------


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, ProvisioningError):
        return Response({"detail": exc.message, "code": exc.code}, status=exc.status_code)
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, DjangoPermissionDenied):
        exc = exceptions.PermissionDenied()
    if isinstance(exc, exceptions.ParseError):
        return Response(
            {
                "detail": INVALID_BODY,
                "code": "invalid",
                "errors": {"non_field_errors": [str(exc.detail)]},
            },
            status=status.HTTP_400_BAD_REQUEST,
        )
    if isinstance(exc, exceptions.ValidationError):
        errors = exc.detail if isinstance(exc.detail, dict) else {"non_field_errors": exc.detail}
        return Response(
            {"detail": INVALID_BODY, "code": "invalid", "errors": errors},
            status=status.HTTP_400_BAD_REQUEST,
        )
    response = drf_exception_handler(exc, context)
    if response is not None and isinstance(exc, exceptions.APIException):
        codes = exc.get_codes()
        code = codes if isinstance(codes, str) else exc.default_code
        detail = exc.detail if isinstance(exc.detail, str) else exc.default_detail
        response.data = {"detail": str(detail), "code": str(code)}
    return response
