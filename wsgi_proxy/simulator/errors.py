"""OpenAI-shaped HTTP errors: :class:`ApiError` and constructors for the cases the simulator answers.

Every failure before the first body byte is an :class:`ApiError`, sent as
``{"error": {"message", "type", "param", "code"}}`` with its status and headers. The Azure gateway's
own refusals (key, ``api-version``, unknown path) use Azure's ``{"error": {"code", "message"}}``.
"""

from __future__ import annotations

import typing as t

from .config import FaultError, Faults

__all__ = [
    "ApiError",
    "azure_access_denied",
    "azure_api_version_unsupported",
    "azure_resource_not_found",
    "bad_json",
    "fault_error",
    "incorrect_api_key",
    "injected_error",
    "invalid_type",
    "invalid_value",
    "missing_api_key",
    "missing_parameter",
    "previous_response_not_found",
    "response_not_found",
    "stream_refused",
]

_JSON_TYPES: dict[type, str] = {
    str: "a string",
    bool: "a boolean",
    int: "an integer",
    float: "a decimal",
    list: "an array",
    dict: "an object",
    type(None): "null",
}


class ApiError(Exception):
    """A failure answered in OpenAI's error envelope before any body byte was sent."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: t.Mapping[str, str] | None = None,
        body: dict[str, t.Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})
        self.body = body
        """A complete body to send instead of OpenAI's envelope (Azure's shapes)."""

    def envelope(self) -> dict[str, t.Any]:
        if self.body is not None:
            return self.body
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _azure(status: int, code: str, message: str) -> ApiError:
    return ApiError(status, message, code=code, body={"error": {"code": code, "message": message}})


def azure_access_denied() -> ApiError:
    """Azure's 401 for a missing or wrong key."""
    return _azure(
        401,
        "401",
        "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid"
        " key for an active subscription and use a correct regional API endpoint for your resource.",
    )


def azure_resource_not_found() -> ApiError:
    """Azure's 404 for an unknown path, or a legacy request without ``api-version``."""
    return _azure(404, "404", "Resource not found")


def azure_api_version_unsupported() -> ApiError:
    """Azure's 400 for an ``api-version`` it does not serve."""
    return _azure(400, "BadRequest", "API version not supported")


def missing_api_key() -> ApiError:
    return ApiError(
        401,
        "You didn't provide an API key. You need to provide your API key in an Authorization header using"
        " Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the password field (with blank username)"
        " if you're accessing the API from your browser and are prompted for a username and password. You"
        " can obtain an API key from https://platform.openai.com/account/api-keys.",
    )


def incorrect_api_key(sent: str) -> ApiError:
    # OpenAI echoes a masked form of the key that was sent; a proxy must not leak it to its own clients.
    return ApiError(
        401,
        f"Incorrect API key provided: {sent[:5]}***{sent[-4:]}. You can find your API key at"
        " https://platform.openai.com/account/api-keys.",
        code="invalid_api_key",
    )


def bad_json() -> ApiError:
    return ApiError(
        400,
        "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your"
        " HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid"
        " JSON. If you have trouble figuring out how to fix this, please contact us through our help center"
        " at help.openai.com.)",
    )


def invalid_type(param: str, expected: str, value: object) -> ApiError:
    got = _JSON_TYPES.get(type(value), "an unknown type")
    message = f"Invalid type for '{param}': expected {expected}, but got {got} instead."
    return ApiError(400, message, param=param, code="invalid_type")


def invalid_value(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_value")


def missing_parameter(param: str) -> ApiError:
    return ApiError(
        400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
    )


def response_not_found(response_id: str) -> ApiError:
    return ApiError(404, f"Response with id '{response_id}' not found.")


def previous_response_not_found(response_id: str) -> ApiError:
    return ApiError(
        400,
        f"Previous response with id '{response_id}' not found.",
        param="previous_response_id",
        code="previous_response_not_found",
    )


def stream_refused(message: str) -> ApiError:
    """The 400 for a ``GET ?stream=true`` that can't be served."""
    return ApiError(400, message, param="stream", code="invalid_request_error")


def fault_error(exc: FaultError) -> ApiError:
    return invalid_value(exc.param, exc.message)


def injected_error(faults: Faults) -> ApiError:
    """The error for ``sim_status``, with ``retry-after``/``x-should-retry`` when asked for."""
    status = t.cast(int, faults.status)
    headers: dict[str, str] = {}
    if faults.retry_after is not None:
        headers["retry-after"] = faults.retry_after
    if faults.should_retry is not None:
        headers["x-should-retry"] = "true" if faults.should_retry else "false"
    if status == 429:
        message = (
            "Rate limit reached for requests in organization org-simulator on requests per min (RPM):"
            " Limit 3, Used 3, Requested 1. Please try again in 20s. Visit"
            " https://platform.openai.com/account/rate-limits to learn more."
        )
        return ApiError(status, message, type="requests", code="rate_limit_exceeded", headers=headers)
    if status == 500:
        message = (
            "The server had an error while processing your request. Sorry about that! You can retry your"
            " request, or contact us through our help center at help.openai.com if the error persists."
        )
        return ApiError(status, message, type="server_error", code="server_error", headers=headers)
    if status in (502, 503, 504):
        message = "The server is overloaded or not ready yet."
        return ApiError(status, message, type="server_error", code="service_unavailable", headers=headers)
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return ApiError(status, f"Simulated error with status {status}.", type=kind, headers=headers)
