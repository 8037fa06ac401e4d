"""The Blueprint's view of an upstream's webhooks: authenticated by their signature, not by a client
key, and handed whole to :class:`~wsgi_proxy.gateway.webhooks.WebhookFanout`."""

from __future__ import annotations

from flask import Blueprint, Response, request

from .hooks import gateway, record
from .inputs import METHODS, read_body, require, respond

__all__ = ["add_rule"]


def webhook(upstream: str) -> Response:
    """``POST /webhooks/<upstream>``: one event of that upstream's, verified and delivered."""
    require("POST")
    body = read_body()
    return respond(gateway().webhooks.receive(upstream, request.headers.get, body, record()))


def add_rule(bp: Blueprint) -> None:
    """Add the webhook route to ``bp``."""
    bp.add_url_rule("/webhooks/<upstream>", "webhook", webhook, methods=METHODS)
