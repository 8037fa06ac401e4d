"""What crosses between the views and the gateway core: a :class:`Call` in, an :class:`Answer` out."""

from __future__ import annotations

import json
import typing as t
from dataclasses import dataclass

from ..upstream.client import StreamedBody
from ..wire.relay import Dialect

__all__ = ["Answer", "Call", "ResumePlan"]


@dataclass(frozen=True, slots=True)
class ResumePlan:
    """How a broken stream of a call is re-opened: the retrieve query that replays it, and the
    response's id when the call already knows it (a retrieve; a create learns it from its events)."""

    query: bytes
    response_id: str | None = None


@dataclass(frozen=True, slots=True)
class Call:
    """One client request for an upstream, as the view validated it: what to send, where it may go,
    and what its answer means to the gateway.

    :param method: the upstream method.
    :param path: below the upstream's base URL, e.g. ``/responses/resp_1/cancel``.
    :param query: the client's raw query string, forwarded unchanged.
    :param headers: the client's headers, as (name, value) pairs.
    :param body: the client's raw body, or an upload streamed from the client, or None.
    :param stream: the answer is expected to be an event stream.
    :param idempotent: the call may be sent again whatever happened to an earlier try.
    :param routed: the call goes where its ``model`` is routed (with failover to its next routes).
    :param model: the model the body names.
    :param owner_id: a response or conversation id the call must be served by the holder of (and only
        for its team).
    :param owned: more ids the call names that its team must own, on the same holder.
    :param resume: how a broken stream is re-opened, or None when it cannot be (not background).
    :param creates: a 2xx answer creates a response (or a conversation), to record with its upstream and team.
    :param background: the response created is a background one.
    :param counts_usage: a 2xx answer carries the token usage to count.
    :param forgets: a 2xx answer deleted ``owner_id``, which the store then forgets.
    :param dialect: how a streamed answer's events read (the Responses API's, or chat completions').
    :param downloads: a 2xx answer's body is relayed as it arrives, whatever it is (a file's content).
    :param lists: a 2xx answer is a list of objects, of which the caller sees only its team's own.
    :param adopts: where a 2xx answer names objects the upstream made for the caller's object (a
        batch's ``output_file_id``, a completed upload's ``file.id``): recorded as the team's too.
    :param session: what ties the call to others of one session (a ``prompt_cache_key``, Codex's
        ``Session-Id``): with several routes, it goes where the session went before.
    """

    method: str
    path: str
    query: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes | StreamedBody | None = None
    stream: bool = False
    idempotent: bool = False
    routed: bool = False
    model: str | None = None
    owner_id: str | None = None
    owned: tuple[str, ...] = ()
    resume: ResumePlan | None = None
    creates: bool = False
    background: bool = False
    counts_usage: bool = False
    forgets: bool = False
    dialect: Dialect = "responses"
    downloads: bool = False
    lists: bool = False
    adopts: tuple[str, ...] = ()
    session: str | None = None

    @property
    def label(self) -> str:
        """The call as logs name it."""
        return f"{self.method} {self.path}"


@dataclass(frozen=True, slots=True)
class Answer:
    """What goes back to the client: a status, headers, and a whole body or one relayed as it
    arrives (an event stream's relay, a download)."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes | t.Iterable[bytes]

    @property
    def streams(self) -> bool:
        return not isinstance(self.body, bytes)

    @classmethod
    def json(cls, payload: t.Any) -> Answer:
        """An answer the gateway makes itself."""
        body = json.dumps(payload, separators=(",", ":")).encode()
        return cls(200, [("Content-Type", "application/json")], body)
