"""Model routing: which upstream(s) a model goes to, in which order, and under which name."""

from __future__ import annotations

import fnmatch
import random
import typing as t
from dataclasses import dataclass

from ..errors import ModelNotFound

if t.TYPE_CHECKING:  # pragma: no cover
    from ..config.file import ModelEntry

__all__ = ["Router", "Target"]


@dataclass(frozen=True)
class Target:
    """One place to send a request: an upstream, and the model's name there (None: unchanged)."""

    upstream: str
    deployment: str | None = None


class Router:
    """Routes public model names to upstreams.

    Exact names win over patterns; among patterns, the first in the file wins. A model's routes are
    tried in a weighted random order (the first one carries the traffic, the others are failover).
    Without a model table every model goes to the only upstream.

    :param models: the file's ``[[models]]``.
    :param upstreams: the upstream names, in file order.
    """

    def __init__(self, models: t.Sequence[ModelEntry], upstreams: t.Sequence[str]) -> None:
        self._exact = {m.name: m for m in models if not _is_pattern(m.name)}
        self._patterns = [m for m in models if _is_pattern(m.name)]
        self._upstreams = tuple(upstreams)
        self._rng = random.Random()

    @property
    def has_table(self) -> bool:
        return bool(self._exact or self._patterns)

    def route(self, model: str | None) -> list[Target]:
        """The targets for ``model`` in the order to try them; :class:`ModelNotFound` if none."""
        if not self.has_table:
            return [Target(self._upstreams[0])]
        entry = self._exact.get(model or "") or next(
            (m for m in self._patterns if model and fnmatch.fnmatchcase(model, m.name)), None
        )
        if entry is None:
            raise ModelNotFound(model)
        routes = list(entry.all_routes)
        ordered = []
        while routes:  # weighted sampling without replacement
            pick = self._rng.choices(range(len(routes)), weights=[r.weight for r in routes])[0]
            route = routes.pop(pick)
            ordered.append(Target(route.upstream, route.deployment))
        return ordered

    def public_names(self) -> list[str]:
        """The exact model names of the table (patterns cannot be listed)."""
        return sorted(self._exact)


def _is_pattern(name: str) -> bool:
    return any(c in name for c in "*?[")
