"""Standard Webhooks signatures, as OpenAI signs its webhooks, and what an event names: pure functions.

A webhook carries ``webhook-id``, ``webhook-timestamp`` (unix seconds) and ``webhook-signature``
(space-separated ``v1,<base64>`` values): the HMAC-SHA256, under the secret, of
``<id>.<timestamp>.<body>``. A secret written ``whsec_<base64>`` is the decoded bytes; any other is
taken as it is, as OpenAI's SDKs do. No I/O.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import typing as t
from dataclasses import dataclass

__all__ = ["TOLERANCE_S", "Event", "SignatureRejected", "event_of", "sign", "verify"]

#: How far a webhook's timestamp may be from now (OpenAI's SDKs use five minutes).
TOLERANCE_S = 300
_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")


class SignatureRejected(ValueError):
    """A webhook's signature, timestamp or id does not hold; the message says which (for logs)."""


def _key(secret: str) -> bytes:
    if secret.startswith("whsec_"):
        try:
            return base64.b64decode(secret[6:], validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("a whsec_ secret must be base64 after its prefix") from None
    return secret.encode()


def sign(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value of ``body`` under ``secret``: ``v1,<base64 HMAC-SHA256>``."""
    signed = webhook_id.encode() + b"." + str(timestamp).encode() + b"." + body
    return "v1," + base64.b64encode(hmac.new(_key(secret), signed, hashlib.sha256).digest()).decode()


def verify(
    secret: str, headers: t.Callable[[str], str | None], body: bytes, now: float, tolerance: int = TOLERANCE_S
) -> str:
    """Check a webhook's signature and timestamp (``headers`` looks a header up by name); returns its
    ``webhook-id``, or raises :class:`SignatureRejected` saying what is wrong."""
    webhook_id, timestamp, given = (
        headers(name) for name in ("webhook-id", "webhook-timestamp", "webhook-signature")
    )
    if not webhook_id or not timestamp or not given:
        raise SignatureRejected("a webhook-id, webhook-timestamp or webhook-signature header is missing")
    if not _ID.fullmatch(webhook_id):
        raise SignatureRejected("the webhook-id is not an id")
    try:
        seconds = int(timestamp)
    except ValueError:
        raise SignatureRejected("the webhook-timestamp is not a number of seconds") from None
    if abs(now - seconds) > tolerance:
        raise SignatureRejected(f"the webhook-timestamp is more than {tolerance} s away from now")
    expected = sign(secret, webhook_id, seconds, body)
    offered = [part for part in given.split() if part.startswith("v1,")]
    if not any(hmac.compare_digest(expected, part) for part in offered):
        raise SignatureRejected("no signature matches the upstream's webhook secret")
    return webhook_id


@dataclass(frozen=True, slots=True)
class Event:
    """What the proxy reads of a webhook event: its type, and the id of the object it is about."""

    type: str
    object_id: str | None


def event_of(body: bytes) -> Event | None:
    """The event a webhook body holds (``{"type": ..., "data": {"id": ...}}``), or None if it is
    not one (never raises)."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(payload, dict) or not isinstance(payload.get("type"), str):
        return None
    data = payload.get("data")
    object_id = data.get("id") if isinstance(data, dict) else None
    return Event(
        payload["type"], object_id if isinstance(object_id, str) and _ID.fullmatch(object_id) else None
    )
