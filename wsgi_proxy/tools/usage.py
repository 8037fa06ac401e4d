"""Usage reports: the store's daily totals grouped as asked, as a table, CSV or JSON.

Pure functions of :class:`~wsgi_proxy.store.UsageRow` lists, so ``wsgi-proxy usage`` and anything
else can render them without touching a store. ``group_by`` names the columns to keep, in order,
from ``day``, ``team``, ``key``, ``model``, ``upstream`` and ``tier``; the others are added up. A
missing name is shown as ``-`` in a table, an empty field in CSV and ``null`` in JSON. CSV and JSON
carry every counter; the table shows the main ones and any other that is not 0. Costs are in US
dollars; ``unpriced`` counts the responses whose model had no price (their cost is left out).
"""

from __future__ import annotations

import csv
import io
import json
import typing as t

from ..store import UsageRow
from ..store.base import USAGE_COLUMNS

__all__ = ["COLUMNS", "GROUPS", "check_group_by", "render_csv", "render_json", "render_table"]

#: The columns a report may be grouped by, in their natural order.
GROUPS = ("day", "team", "key", "model", "upstream", "tier")

#: The counted columns, in the order every format shows them (``cost_usd`` for the cost).
COLUMNS = tuple("cost_usd" if name == "cost_nano_usd" else name for name in USAGE_COLUMNS)

#: The counted columns a table always shows; the others only when they are not 0.
_TABLE_ALWAYS = frozenset(
    {
        "responses",
        "input_tokens",
        "cached_input_tokens",
        "output_tokens",
        "reasoning_tokens",
        "total_tokens",
        "cost_usd",
    }
)
_FIELDS = {
    "day": "day",
    "team": "team",
    "key": "key_name",
    "model": "model",
    "upstream": "upstream",
    "tier": "service_tier",
}
_HEADINGS = {
    "input_tokens": "input",
    "cached_input_tokens": "cached",
    "cache_write_tokens": "cache writes",
    "input_image_tokens": "image in",
    "input_audio_tokens": "audio in",
    "output_tokens": "output",
    "reasoning_tokens": "reasoning",
    "output_audio_tokens": "audio out",
    "total_tokens": "total",
    "web_search_calls": "web searches",
    "file_search_calls": "file searches",
    "code_interpreter_calls": "code runs",
    "image_generation_calls": "images made",
    "cost_usd": "cost (USD)",
}

_Group = tuple[str | None, ...]
_NANO = 1e9


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
    """The sums of every counted column per distinct ``group_by`` values, sorted with None first."""
    sums: dict[_Group, list[int]] = {}
    for row in rows:
        group = tuple(getattr(row, _FIELDS[name]) for name in group_by)
        counts = sums.setdefault(group, [0] * len(USAGE_COLUMNS))
        for index, column in enumerate(USAGE_COLUMNS):
            counts[index] += row.value(column)
    ordered = sorted(sums.items(), key=lambda item: [(value is not None, value or "") for value in item[0]])
    return [(group, tuple(counts)) for group, counts in ordered]


def _total(groups: t.Sequence[tuple[_Group, tuple[int, ...]]]) -> tuple[int, ...]:
    return tuple(sum(counts[index] for _, counts in groups) for index in range(len(USAGE_COLUMNS)))


def _values(counts: tuple[int, ...]) -> dict[str, int | float]:
    """The counted columns by their reported names, the cost in US dollars."""
    return {
        name: count / _NANO if name == "cost_usd" else count
        for name, count in zip(COLUMNS, counts, strict=True)
    }


def render_table(rows: t.Iterable[UsageRow], group_by: t.Sequence[str]) -> str:
    """An aligned text table of the grouped totals, a rule, and a ``total`` line; ends with a newline.

    Names are left-aligned and numbers right-aligned with thousands separators, costs with six
    decimals. Without any ``group_by`` column the table is just the total line.
    """
    columns = check_group_by(group_by)
    groups = _aggregate(rows, columns)
    total = _values(_total(groups))
    shown = [name for name in COLUMNS if name in _TABLE_ALWAYS or total[name]]

    def cells(counts: tuple[int, ...]) -> list[str]:
        values = _values(counts)
        return [f"{values[name]:,.6f}" if name == "cost_usd" else f"{values[name]:,}" for name in shown]

    labels = list(columns) or [""]
    header = [*labels, *(_HEADINGS.get(name, name) for name in shown)]
    body = [
        [*(value if value is not None else "-" for value in group), *cells(counts)]
        for group, counts in groups
        if columns
    ]
    lines = [header, *body, ["total", *[""] * (len(labels) - 1), *cells(_total(groups))]]
    widths = [max(len(line[index]) for line in lines) for index in range(len(header))]

    def format_line(line: t.Sequence[str]) -> str:
        names = [cell.ljust(width) for cell, width in zip(line, widths[: len(labels)], strict=False)]
        numbers = [
            cell.rjust(width) for cell, width in zip(line[len(labels) :], widths[len(labels) :], strict=True)
        ]
        return "  ".join([*names, *numbers]).rstrip()

    rule = "  ".join("-" * width for width in widths)
    out = [format_line(header), rule, *(format_line(line) for line in body)]
    if body:
        out.append(rule)
    out.append(format_line(lines[-1]))
    return "\n".join(out) + "\n"


def render_csv(rows: t.Iterable[UsageRow], group_by: t.Sequence[str]) -> str:
    """The grouped totals as CSV with a header line and no total line (spreadsheets add that up)."""
    columns = check_group_by(group_by)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*columns, *COLUMNS])
    for group, counts in _aggregate(rows, columns):
        values = [f"{v:.9f}" if isinstance(v, float) else v for v in _values(counts).values()]
        writer.writerow([*("" if value is None else value for value in group), *values])
    return out.getvalue()


def render_json(rows: t.Iterable[UsageRow], group_by: t.Sequence[str]) -> str:
    """The grouped totals as one JSON object: ``group_by``, the ``rows`` and their ``total``."""
    columns = check_group_by(group_by)
    groups = _aggregate(rows, columns)
    document = {
        "group_by": list(columns),
        "rows": [dict(zip(columns, group, strict=True)) | _values(counts) for group, counts in groups],
        "total": _values(_total(groups)),
    }
    return json.dumps(document, indent=2) + "\n"
