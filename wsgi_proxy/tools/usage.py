"""Token usage reports: the store's daily totals grouped as asked, as a table, CSV or JSON.

Pure functions of :class:`~wsgi_proxy.store.UsageRow` lists, so ``wsgi-proxy usage`` and anything
else can render them without touching a store. ``group_by`` names the columns to keep, in order,
from ``day``, ``team``, ``key`` and ``model``; the others are added up. A missing key, team or model
is shown as ``-`` in a table, an empty field in CSV and ``null`` in JSON.
"""

from __future__ import annotations

import csv
import io
import json
import typing as t

from ..store import UsageRow

__all__ = ["COUNTERS", "GROUPS", "check_group_by", "render_csv", "render_json", "render_table"]

#: The columns a report may be grouped by, in their natural order.
GROUPS = ("day", "team", "key", "model")

#: The counted columns, in the order every format shows them.
COUNTERS = ("responses", "input_tokens", "output_tokens", "total_tokens")

_FIELDS = {"day": "day", "team": "team", "key": "key_name", "model": "model"}
_HEADINGS = {"input_tokens": "input", "output_tokens": "output", "total_tokens": "total"}

_Group = tuple[str | None, ...]


def check_group_by(group_by: t.Sequence[str]) -> tuple[str, ...]:
    """``group_by`` as a tuple, or ValueError if it names an unknown column or one twice."""
    if isinstance(group_by, str):  # a bare "day,team" would otherwise be read letter by letter
        raise TypeError("group_by must be a sequence of column names, not a string.")
    unknown = [name for name in group_by if name not in GROUPS]
    if unknown:
        raise ValueError(f"Usage cannot be grouped by {unknown[0]!r}; choose among {', '.join(GROUPS)}.")
    repeated = sorted({name for name in group_by if list(group_by).count(name) > 1})
    if repeated:
        raise ValueError(f"Usage is grouped by {repeated[0]!r} twice; name each column once.")
    return tuple(group_by)


def _aggregate(rows: t.Iterable[UsageRow], group_by: tuple[str, ...]) -> list[tuple[_Group, tuple[int, ...]]]:
    """The sums of ``COUNTERS`` per distinct ``group_by`` values, sorted with None first."""
    sums: dict[_Group, list[int]] = {}
    for row in rows:
        group = tuple(getattr(row, _FIELDS[name]) for name in group_by)
        counts = sums.setdefault(group, [0] * len(COUNTERS))
        for index, counter in enumerate(COUNTERS):
            counts[index] += getattr(row, counter)
    ordered = sorted(sums.items(), key=lambda item: [(value is not None, value or "") for value in item[0]])
    return [(group, tuple(counts)) for group, counts in ordered]


def _total(groups: t.Sequence[tuple[_Group, tuple[int, ...]]]) -> tuple[int, ...]:
    return tuple(sum(counts[index] for _, counts in groups) for index in range(len(COUNTERS)))


def render_table(rows: t.Iterable[UsageRow], group_by: t.Sequence[str]) -> str:
    """An aligned text table of the grouped totals, a rule, and a ``total`` line; ends with a newline.

    Names are left-aligned and numbers right-aligned with thousands separators. Without any
    ``group_by`` column the table is just the total line.
    """
    columns = check_group_by(group_by)
    groups = _aggregate(rows, columns)
    labels = list(columns) or [""]
    header = [*labels, *(_HEADINGS.get(name, name) for name in COUNTERS)]
    body = [
        [*(value if value is not None else "-" for value in group), *(f"{n:,}" for n in counts)]
        for group, counts in groups
        if columns
    ]
    total = ["total", *[""] * (len(labels) - 1), *(f"{n:,}" for n in _total(groups))]
    lines = [header, *body, total]
    widths = [max(len(line[index]) for line in lines) for index in range(len(header))]

    def format_line(cells: t.Sequence[str]) -> str:
        names = [cell.ljust(width) for cell, width in zip(cells, widths[: len(labels)], strict=False)]
        numbers = [
            cell.rjust(width) for cell, width in zip(cells[len(labels) :], widths[len(labels) :], strict=True)
        ]
        return "  ".join([*names, *numbers]).rstrip()

    rule = "  ".join("-" * width for width in widths)
    out = [format_line(header), rule, *(format_line(line) for line in body)]
    if body:
        out.append(rule)
    out.append(format_line(total))
    return "\n".join(out) + "\n"


def render_csv(rows: t.Iterable[UsageRow], group_by: t.Sequence[str]) -> str:
    """The grouped totals as CSV with a header line and no total line (spreadsheets add that up)."""
    columns = check_group_by(group_by)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*columns, *COUNTERS])
    for group, counts in _aggregate(rows, columns):
        writer.writerow([*("" if value is None else value for value in group), *counts])
    return out.getvalue()


def render_json(rows: t.Iterable[UsageRow], group_by: t.Sequence[str]) -> str:
    """The grouped totals as one JSON object: ``group_by``, the ``rows`` and their ``total``."""
    columns = check_group_by(group_by)
    groups = _aggregate(rows, columns)
    document = {
        "group_by": list(columns),
        "rows": [
            dict(zip((*columns, *COUNTERS), (*group, *counts), strict=True)) for group, counts in groups
        ],
        "total": dict(zip(COUNTERS, _total(groups), strict=True)),
    }
    return json.dumps(document, indent=2) + "\n"
