"""Webhook fan-out: an upstream's webhooks, verified, re-signed and delivered to the team that owns
what they are about.

OpenAI sends a project's webhooks to one URL. Each upstream's arrive at ``/webhooks/<upstream>``;
the signature is checked with that upstream's secret (a bad one is a 400, and nothing is
delivered), the object the event names is looked up in the locator, and the event goes, with the
same body and ``webhook-id``, to its team's URL signed with the team's own secret, so that the
team verifies it with the SDK's ``webhooks.unwrap`` unchanged. An event about an object no team is
known to own (or of a team without a URL) goes to the operator's URL. The sender is answered 200
only once the destination took the event (2xx); otherwise 502, and the sender retries: there is no
queue of the gateway's own to lose events. A ``webhook-id`` delivered once is acknowledged again
without a second delivery, for seven days.
"""

from __future__ import annotations

import logging
import time
import typing as t

import requests

from ..config.gateway import WebhookDestination
from ..errors import InvalidRequest, RouteNotFound, StoreUnavailable, WebhookUndelivered
from ..observe.record import RequestRecord
from ..store import StoreError
from ..wire.webhooks import SignatureRejected, event_of, sign, verify
from .call import Answer
from .state import GatewayState

__all__ = ["DELIVERED_TTL_S", "WebhookFanout"]

log = logging.getLogger("wsgi_proxy.webhooks")

#: How long a delivered ``webhook-id`` is remembered (OpenAI retries for up to 72 hours).
DELIVERED_TTL_S = 7 * 86400.0
#: Seconds to connect to a destination, and to wait for its answer.
DELIVERY_TIMEOUT = (5.0, 15.0)


class WebhookFanout:
    """The gateway's webhook receiver (one per worker; its session pools the deliveries)."""

    def __init__(self, state: GatewayState) -> None:
        self.state = state
        self._session = requests.Session()
        self._session.trust_env = False

    def receive(
        self, upstream: str, header: t.Callable[[str], str | None], body: bytes, record: RequestRecord
    ) -> Answer:
        """Verify, route and deliver one webhook from ``upstream``; the answer for its sender.

        :raises ~wsgi_proxy.errors.ProxyError: a 404 for an upstream without webhooks, a 400 for a bad
            signature or body, a 503 when the locator cannot be asked, a 502 when delivery failed.
        """
        webhooks = self.state.webhooks
        record.attempt(upstream)
        secret = webhooks.secrets.get(upstream)
        if secret is None:
            raise RouteNotFound(
                f"This gateway receives no webhooks for {upstream!r}. Its operator can set"
                " webhook_secret_env on that upstream in the configuration file."
            )
        try:
            webhook_id = verify(secret, header, body, time.time())
        except SignatureRejected as exc:
            log.warning("refused a webhook for upstream %s: %s", upstream, exc)
            raise InvalidRequest(
                f"The webhook was refused: {exc}. Nothing was delivered.",
                param=None,
                code="invalid_signature",
            ) from None
        event = event_of(body)
        if event is None:
            raise InvalidRequest(
                "The webhook's body is not an event (a JSON object with a type).", param=None
            )
        try:
            if self.state.store.marked(f"webhook:{webhook_id}"):
                return Answer.json({"delivered": True, "duplicate": True})
            team = self._owner(event.object_id, upstream)
        except StoreError as exc:
            log.error("could not route webhook %s: the state store failed: %s", webhook_id, exc)
            raise StoreUnavailable() from None
        record.identified(None, team)
        destination = webhooks.teams.get(team) if team is not None else None
        destination = destination or webhooks.operator
        if destination is None:
            log.warning(
                "webhook %s (%s) has nowhere to go: %s; acknowledged, not delivered",
                webhook_id,
                event.type,
                f"team {team} has no webhook_url"
                if team
                else "no team owns it and there is no operator_webhook",
            )
            return Answer.json({"delivered": False})
        self._deliver(destination, webhook_id, body, team)
        log.info(
            "webhook %s (%s) from upstream %s delivered for team %s", webhook_id, event.type, upstream, team
        )
        try:
            self.state.store.mark(f"webhook:{webhook_id}", DELIVERED_TTL_S)
        except StoreError as exc:  # delivered: a retry of the sender would deliver it once more, no worse
            log.error("could not remember that webhook %s was delivered: %s", webhook_id, exc)
        return Answer.json({"delivered": True})

    def _owner(self, object_id: str | None, upstream: str) -> str | None:
        """The team that owns ``object_id`` on ``upstream``, where the locator knows it."""
        if object_id is None:
            return None
        found = self.state.pending.response(object_id) or self.state.store.get_response(object_id)
        if found is None or found.upstream != upstream:
            return None
        return found.team

    def _deliver(
        self, destination: WebhookDestination, webhook_id: str, body: bytes, team: str | None
    ) -> None:
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "wsgi-proxy-webhooks",
            "webhook-id": webhook_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(destination.secret, webhook_id, timestamp, body),
        }
        whose = (
            f"team {team}'s"
            if team and destination is self.state.webhooks.teams.get(team)
            else "the operator's"
        )
        try:
            answer = self._session.post(
                destination.url, data=body, headers=headers, timeout=DELIVERY_TIMEOUT, allow_redirects=False
            )
            answer.close()
        except requests.RequestException as exc:
            log.warning("webhook %s could not reach %s endpoint: %s", webhook_id, whose, type(exc).__name__)
            raise WebhookUndelivered(
                f"The webhook could not be delivered to {whose} endpoint ({type(exc).__name__}); retry later."
            ) from None
        if not 200 <= answer.status_code < 300:
            log.warning("webhook %s: %s endpoint answered %d", webhook_id, whose, answer.status_code)
            raise WebhookUndelivered(
                f"The webhook was not taken by {whose} endpoint (HTTP {answer.status_code}); retry later."
            )
