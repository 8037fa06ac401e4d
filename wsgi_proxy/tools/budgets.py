"""``wsgi-proxy budgets``: every budget of the configuration's teams and keys (and of the keys kept
in the store), with what is used of it now, what is left, and when it resets."""

from __future__ import annotations

import json
import time
import typing as t

from pydantic import ValidationError

from ..config.file import FileConfig, KeyLimits
from ..config.gateway import Budget, identity_of
from ..store import Store
from ..store.base import window_end

__all__ = ["budget_rows", "render_budgets"]


def _budgets(config: FileConfig, store: Store) -> list[Budget]:
    """The distinct budgets of every key of the file and of the store, in the order met."""
    identities = [identity_of(key.name, key.team, config.teams[key.team], key) for key in config.keys]
    for record in store.list_keys() if config.keys_in_store else ():
        team = config.teams.get(record.team)
        if team is None or not record.usable(time.time()):
            continue
        try:
            identities.append(
                identity_of(record.name, record.team, team, KeyLimits.model_validate_json(record.limits))
            )
        except ValidationError:
            continue  # the gateway refuses such a key; it spends nothing
    return list(dict.fromkeys(budget for identity in identities for budget in identity.budgets))


def budget_rows(config: FileConfig, store: Store, now: float) -> list[dict[str, t.Any]]:
    """One row per budget: who, which, its limit, what is used and left now, and when it resets
    (US dollars for cost budgets, tokens otherwise)."""
    budgets = _budgets(config, store)
    spent = store.spend(sorted({b.counter for b in budgets}), now)
    rows = []
    for budget in budgets:
        used = spent[budget.counter].against(budget.kind)
        rows.append(
            {
                "counter": budget.counter,
                "budget": budget.kind,
                "limit": _shown(budget.limit, budget.kind),
                "used": _shown(used, budget.kind),
                "left": _shown(max(0, budget.limit - used), budget.kind),
                "resets": f"{window_end(budget.kind, now):%Y-%m-%dT%H:%M:%SZ}",
                "spent": used >= budget.limit,
            }
        )
    return rows


def _shown(amount: int, kind: str) -> float | int:
    """A budget's amount as reported: cost budgets are kept in nano-dollars and shown in dollars."""
    return amount / 1e9 if kind.startswith("usd") else amount


def render_budgets(rows: t.Sequence[t.Mapping[str, t.Any]], fmt: str) -> str:
    """The rows as an aligned table or JSON."""
    if fmt == "json":
        return json.dumps(list(rows), indent=2) + "\n"

    def amount(value: float, kind: str) -> str:
        return f"{value:,.6f}" if kind.startswith("usd") else f"{int(value):,}"

    header = ["who", "budget", "limit", "used", "left", "resets", "state"]
    lines = [header] + [
        [
            row["counter"],
            row["budget"],
            amount(row["limit"], row["budget"]),
            amount(row["used"], row["budget"]),
            amount(row["left"], row["budget"]),
            row["resets"],
            "spent" if row["spent"] else "open",
        ]
        for row in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    numeric = {2, 3, 4}
    out = [
        "  ".join(
            cell.rjust(w) if i in numeric else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in lines
    ]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out) + "\n"
