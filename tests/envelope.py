"""The one check of the error envelope every failure of the proxy must have."""

from __future__ import annotations

import json
import typing as t

import requests
from werkzeug.test import TestResponse

#: Accept any value for a field the caller does not pin.
ANY: t.Any = object()


def assert_error(
    resp: TestResponse | requests.Response,
    status: int,
    *,
    param: str | None = None,
    code: str | None = ANY,
    type: str | None = ANY,
) -> dict[str, t.Any]:
    """Check that ``resp`` is OpenAI's error envelope with ``status``; return its ``error`` object.

    The body is JSON with ``error`` as its only key, holding exactly ``message`` (a sentence),
    ``type``, ``param`` and ``code``; ``param`` must equal the one given, ``code`` and ``type``
    when given.
    """
    content = resp.data if isinstance(resp, TestResponse) else resp.content
    assert resp.status_code == status, content[:2000]
    assert resp.headers.get("Content-Type", "").split(";")[0] == "application/json"
    body = json.loads(content)
    assert list(body) == ["error"]
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"].endswith((".", ")"))
    assert isinstance(error["type"], str) and error["type"]
    assert error["param"] == param
    if code is not ANY:
        assert error["code"] == code
    if type is not ANY:
        assert error["type"] == type
    return t.cast(dict[str, t.Any], error)
