"""Usage reports: the renderers as tables of cases, and ``wsgi-proxy usage`` against a real SQLite store."""

from __future__ import annotations

import datetime
import json
import textwrap
import typing as t
from pathlib import Path

import pytest

from wsgi_proxy.store import UsageEntry, UsageRow
from wsgi_proxy.store.sqlite import SQLiteStore
from wsgi_proxy.tools.cli import main
from wsgi_proxy.tools.usage import COLUMNS, check_group_by, render_csv, render_json, render_table
from wsgi_proxy.wire.usage import COUNTERS, Usage


def usage_row(
    day: str,
    key: str | None,
    team: str | None,
    model: str | None,
    responses: int,
    tokens: tuple[int, int, int],
    *,
    cost: int = 0,
    unpriced: int = 0,
    **usage: int | str,
) -> UsageRow:
    """A row of ``responses`` that used ``tokens`` (input, output, total) and the other ``usage``
    counters; ``upstream`` and ``service_tier`` may be given among them too."""
    names = {name: usage.pop(name) for name in ("upstream", "service_tier") if name in usage}
    counts = dict(zip(("input_tokens", "output_tokens", "total_tokens"), tokens, strict=True))
    return UsageRow(
        day,
        key,
        team,
        model,
        responses=responses,
        usage=Usage(**counts, **t.cast(dict[str, int], usage)),
        cost_nano_usd=cost,
        unpriced=unpriced,
        **t.cast(dict[str, str], names),
    )


ROWS = [
    usage_row(
        "2025-01-30",
        "ci",
        "search",
        "gpt-4o",
        2,
        (1200, 300, 1500),
        cached_input_tokens=200,
        reasoning_tokens=100,
        cost=5_000_000,
        upstream="openai",
        service_tier="default",
    ),
    usage_row("2025-01-30", None, None, None, 1, (10, 5, 15), unpriced=1),
    usage_row(
        "2025-01-31",
        "bob",
        "ads",
        "gpt-4o-mini",
        3,
        (1_000_000, 20, 1_000_020),
        cost=150_012_000,
        upstream="openai",
        service_tier="flex",
    ),
    usage_row(
        "2025-01-31",
        "ci",
        "search",
        "gpt-4o",
        1,
        (100, 50, 150),
        web_search_calls=2,
        cost=750_000,
        upstream="azure",
        service_tier="default",
    ),
]


def dedent(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


class TestTable:
    @pytest.mark.parametrize(
        ("group_by", "expected"),
        [
            (
                ["day", "team", "key", "model"],
                """
                day         team    key  model        responses      input  cached  output  reasoning      total  web searches  cost (USD)  unpriced
                ----------  ------  ---  -----------  ---------  ---------  ------  ------  ---------  ---------  ------------  ----------  --------
                2025-01-30  -       -    -                    1         10       0       5          0         15             0    0.000000         1
                2025-01-30  search  ci   gpt-4o               2      1,200     200     300        100      1,500             0    0.005000         0
                2025-01-31  ads     bob  gpt-4o-mini          3  1,000,000       0      20          0  1,000,020             0    0.150012         0
                2025-01-31  search  ci   gpt-4o               1        100       0      50          0        150             2    0.000750         0
                ----------  ------  ---  -----------  ---------  ---------  ------  ------  ---------  ---------  ------------  ----------  --------
                total                                         7  1,001,310     200     375        100  1,001,685             2    0.155762         1
                """,
            ),
            (
                ["upstream", "tier"],
                """
                upstream  tier     responses      input  cached  output  reasoning      total  web searches  cost (USD)  unpriced
                --------  -------  ---------  ---------  ------  ------  ---------  ---------  ------------  ----------  --------
                -         -                1         10       0       5          0         15             0    0.000000         1
                azure     default          1        100       0      50          0        150             2    0.000750         0
                openai    default          2      1,200     200     300        100      1,500             0    0.005000         0
                openai    flex             3  1,000,000       0      20          0  1,000,020             0    0.150012         0
                --------  -------  ---------  ---------  ------  ------  ---------  ---------  ------------  ----------  --------
                total                      7  1,001,310     200     375        100  1,001,685             2    0.155762         1
                """,
            ),
            (
                ["team"],
                """
                team    responses      input  cached  output  reasoning      total  web searches  cost (USD)  unpriced
                ------  ---------  ---------  ------  ------  ---------  ---------  ------------  ----------  --------
                -               1         10       0       5          0         15             0    0.000000         1
                ads             3  1,000,000       0      20          0  1,000,020             0    0.150012         0
                search          3      1,300     200     350        100      1,650             2    0.005750         0
                ------  ---------  ---------  ------  ------  ---------  ---------  ------------  ----------  --------
                total           7  1,001,310     200     375        100  1,001,685             2    0.155762         1
                """,
            ),
            (
                [],
                """
                       responses      input  cached  output  reasoning      total  web searches  cost (USD)  unpriced
                -----  ---------  ---------  ------  ------  ---------  ---------  ------------  ----------  --------
                total          7  1,001,310     200     375        100  1,001,685             2    0.155762         1
                """,
            ),
        ],
    )
    def test_groups(self, group_by: list[str], expected: str) -> None:
        assert render_table(ROWS, group_by) == dedent(expected)

    def test_counters_that_are_all_zero_are_left_out_except_the_main_ones(self) -> None:
        assert render_table([], ["day", "team"]) == dedent(
            """
            day    team  responses  input  cached  output  reasoning  total  cost (USD)
            -----  ----  ---------  -----  ------  ------  ---------  -----  ----------
            total                0      0       0       0          0      0    0.000000
            """
        )

    def test_accepts_any_iterable_once(self) -> None:
        assert render_table(iter(ROWS), ("day",)) == render_table(ROWS, ["day"])


class TestCsv:
    HEADER = ",".join(COLUMNS)

    @pytest.mark.parametrize(
        ("group_by", "expected"),
        [
            (
                ["day"],
                """
                day,{header}
                2025-01-30,3,1210,200,0,0,0,305,100,0,1515,0,0,0,0,0.005000000,1
                2025-01-31,4,1000100,0,0,0,0,70,0,0,1000170,2,0,0,0,0.150762000,0
                """,
            ),
            (
                ["key", "team"],
                """
                key,team,{header}
                ,,1,10,0,0,0,0,5,0,0,15,0,0,0,0,0.000000000,1
                bob,ads,3,1000000,0,0,0,0,20,0,0,1000020,0,0,0,0,0.150012000,0
                ci,search,3,1300,200,0,0,0,350,100,0,1650,2,0,0,0,0.005750000,0
                """,
            ),
            (
                [],
                """
                {header}
                7,1001310,200,0,0,0,375,100,0,1001685,2,0,0,0,0.155762000,1
                """,
            ),
        ],
    )
    def test_groups_with_every_column(self, group_by: list[str], expected: str) -> None:
        assert render_csv(ROWS, group_by) == dedent(expected).format(header=self.HEADER)

    def test_names_are_quoted_when_needed(self) -> None:
        rows = [usage_row("2025-01-30", 'a,"b"', None, None, 1, (1, 1, 2))]
        assert render_csv(rows, ["key"]).splitlines()[1].startswith('"a,""b""",1,1,')


class TestJson:
    def test_rows_and_total_carry_every_column_and_the_cost_in_dollars(self) -> None:
        document = json.loads(render_json(ROWS, ["team", "model"]))
        assert document["group_by"] == ["team", "model"]
        assert [list(row) for row in document["rows"]] == [["team", "model", *COLUMNS]] * 3
        assert [(r["team"], r["model"], r["responses"], r["cost_usd"]) for r in document["rows"]] == [
            (None, None, 1, 0.0),
            ("ads", "gpt-4o-mini", 3, 0.150012),
            ("search", "gpt-4o", 3, 0.00575),
        ]
        assert document["total"] == {name: sum(r[name] for r in document["rows"]) for name in COLUMNS}
        assert document["total"]["cost_usd"] == pytest.approx(0.155762)

    def test_no_rows(self) -> None:
        zero = {name: 0.0 if name == "cost_usd" else 0 for name in COLUMNS}
        assert json.loads(render_json([], ["day"])) == {"group_by": ["day"], "rows": [], "total": zero}


@pytest.mark.parametrize(
    ("group_by", "message"),
    [
        (
            ["day", "user"],
            "Usage cannot be grouped by 'user'; choose among day, team, key, model, upstream, tier.",
        ),
        (
            ["key_name"],
            "Usage cannot be grouped by 'key_name'; choose among day, team, key, model, upstream, tier.",
        ),
        (["day", "team", "day"], "Usage is grouped by 'day' twice; name each column once."),
    ],
)
@pytest.mark.parametrize("render", [render_table, render_csv, render_json])
def test_bad_group_by_is_refused(
    render: t.Callable[[list[UsageRow], list[str]], str], group_by: list[str], message: str
) -> None:
    with pytest.raises(ValueError) as caught:
        render(ROWS, group_by)
    assert str(caught.value) == message


def test_a_string_is_not_a_group_by() -> None:
    with pytest.raises(TypeError, match="not a string"):
        check_group_by("day")


# The CLI, against a store the test fills.


def noon(day: str) -> float:
    return datetime.datetime.fromisoformat(f"{day}T12:00").replace(tzinfo=datetime.UTC).timestamp()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    """An SQLite store holding ``ROWS``'s totals, recorded one response at a time."""
    path = tmp_path / "state.db"
    with SQLiteStore(path) as store:
        number = 0
        for row in ROWS:
            # Spread the row's counts over its responses: the first takes what division leaves over.
            for index in range(row.responses):

                def share(total: int, index: int = index, row: UsageRow = row) -> int:
                    return total // row.responses + (total % row.responses if index == 0 else 0)

                number += 1
                usage = Usage(**{name: share(getattr(row.usage, name)) for name in COUNTERS})
                entry = UsageEntry(
                    f"resp_{number}",
                    key_name=row.key_name,
                    team=row.team,
                    model=row.model,
                    upstream=row.upstream,
                    service_tier=row.service_tier,
                    usage=usage,
                    cost_nano_usd=None if index < row.unpriced else share(row.cost_nano_usd),
                )
                assert store.record_usage(entry, at=noon(row.day))
        assert store.usage_totals() == sorted(ROWS, key=lambda r: (r.day, r.team or "", r.key_name or ""))
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(["usage", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def config_file(tmp_path: Path, store_url: str | None) -> Path:
    """A valid configuration file whose upstream key lives in OPENAI_KEY_FOR_TEST."""
    path = tmp_path / "gateway.toml"
    lines = [f"store_url = {json.dumps(store_url)}"] if store_url is not None else []
    lines += [
        "allow_anonymous = true",
        "[[upstreams]]",
        'name = "openai"',
        'url = "https://api.openai.com/v1"',
        'api_key_env = "OPENAI_KEY_FOR_TEST"',
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


class TestCli:
    def test_default_report_is_the_full_table(self, capsys: pytest.CaptureFixture[str], db: Path) -> None:
        status, out, err = run(capsys, "--store", f"sqlite:///{db}")
        assert (status, err) == (0, "")
        assert out == render_table(ROWS, ["day", "team", "key", "model"])

    @pytest.mark.parametrize(
        ("argv", "render", "rows", "group_by"),
        [
            (["--by", "team", "--format", "csv"], render_csv, ROWS, ["team"]),
            (["--by", " model , day ", "--format", "json"], render_json, ROWS, ["model", "day"]),
            (["--since", "2025-01-31"], render_table, ROWS[2:], ["day", "team", "key", "model"]),
            (["--until", "2025-01-30", "--by", "key"], render_table, ROWS[:2], ["key"]),
            (["--since", "2025-01-31", "--until", "2025-01-31", "--by", ""], render_table, ROWS[2:], []),
        ],
    )
    def test_options(
        self,
        capsys: pytest.CaptureFixture[str],
        db: Path,
        argv: list[str],
        render: t.Callable[[list[UsageRow], list[str]], str],
        rows: list[UsageRow],
        group_by: list[str],
    ) -> None:
        status, out, _ = run(capsys, "--store", str(db), *argv)
        assert status == 0
        assert out == render(rows, group_by)

    def test_empty_period_prints_a_zero_total_and_a_note(
        self, capsys: pytest.CaptureFixture[str], db: Path
    ) -> None:
        status, out, err = run(capsys, "--store", str(db), "--since", "2026-01-01", "--format", "csv")
        assert status == 0
        assert out == "day,team,key,model," + ",".join(COLUMNS) + "\n"
        assert err == "wsgi-proxy: The store holds no token usage for those days.\n"

    def test_store_from_the_environment(
        self, capsys: pytest.CaptureFixture[str], db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("WSGI_PROXY_STORE_URL", f"sqlite:///{db}")
        monkeypatch.setenv("WSGI_PROXY_CONFIG", str(config_file(tmp_path, "sqlite:///elsewhere.db")))
        status, out, _ = run(capsys, "--by", "day", "--format", "csv")
        assert status == 0 and out == render_csv(ROWS, ["day"])

    def test_store_option_beats_the_environment(
        self, capsys: pytest.CaptureFixture[str], db: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("WSGI_PROXY_STORE_URL", "redis://127.0.0.1:1/0")
        status, out, _ = run(capsys, "--store", str(db), "--by", "day", "--format", "csv")
        assert status == 0 and out == render_csv(ROWS, ["day"])

    @pytest.mark.parametrize("how", ["option", "environment"])
    @pytest.mark.parametrize("secret_set", [True, False], ids=["valid-file", "secret-unset"])
    def test_store_from_the_config_file(
        self,
        capsys: pytest.CaptureFixture[str],
        db: Path,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        how: str,
        secret_set: bool,
    ) -> None:
        path = config_file(tmp_path, f"sqlite:///{db}")
        if secret_set:
            monkeypatch.setenv("OPENAI_KEY_FOR_TEST", "sk-test")
        else:
            monkeypatch.delenv("OPENAI_KEY_FOR_TEST", raising=False)
        if how == "option":
            argv = ["--config", str(path)]
        else:
            monkeypatch.setenv("WSGI_PROXY_CONFIG", str(path))
            argv = []
        status, out, err = run(capsys, *argv, "--by", "team", "--format", "json")
        assert (status, err) == (0, "")
        assert out == render_json(ROWS, ["team"])

    def test_no_store_named(self, capsys: pytest.CaptureFixture[str]) -> None:
        status, out, err = run(capsys)
        assert (status, out) == (2, "")
        assert err.startswith("wsgi-proxy: No store is named")
        for hint in ("--store", "WSGI_PROXY_STORE_URL", "--config", "WSGI_PROXY_CONFIG"):
            assert hint in err
        assert err.endswith(".\n")

    def test_config_file_without_store_url(self, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
        path = config_file(tmp_path, None)
        status, _, err = run(capsys, "--config", str(path))
        assert status == 2
        assert f"The configuration file {str(path)!r} sets no store_url" in err
        assert "sqlite:///" in err and "--store" in err and err.endswith(".\n")

    def test_unreadable_config_file(self, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
        status, _, err = run(capsys, "--config", str(tmp_path / "missing.toml"))
        assert status == 2
        assert "could not be read" in err and err.endswith(".\n")

    def test_store_url_that_is_not_a_string(self, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
        path = tmp_path / "gateway.toml"
        path.write_text("store_url = 5\n")
        status, _, err = run(capsys, "--config", str(path))
        assert status == 2
        assert "sets store_url to 5, which is not a URL" in err

    @pytest.mark.parametrize(
        ("argv", "message"),
        [
            (
                ["--since", "2025-13-01"],
                "--since must be a date written YYYY-MM-DD, such as 2025-01-31, not '2025-13-01'.",
            ),
            (
                ["--until", "31/01/2025"],
                "--until must be a date written YYYY-MM-DD, such as 2025-01-31, not '31/01/2025'.",
            ),
            (
                ["--since", "2025-02-01", "--until", "2025-01-31"],
                "--since 2025-02-01 is after --until 2025-01-31; swap the two dates.",
            ),
            (
                ["--by", "day,user"],
                "Usage cannot be grouped by 'user'; choose among day, team, key, model, upstream, tier.",
            ),
        ],
    )
    def test_bad_arguments_exit_2(
        self, capsys: pytest.CaptureFixture[str], db: Path, argv: list[str], message: str
    ) -> None:
        status, out, err = run(capsys, "--store", str(db), *argv)
        assert (status, out, err) == (2, "", f"wsgi-proxy: {message}\n")

    def test_bad_format_is_refused_by_argparse(self, capsys: pytest.CaptureFixture[str], db: Path) -> None:
        with pytest.raises(SystemExit) as caught:
            main(["usage", "--store", str(db), "--format", "xml"])
        assert caught.value.code == 2
        assert "invalid choice: 'xml'" in capsys.readouterr().err

    def test_missing_sqlite_file_is_an_error_not_a_new_store(
        self, capsys: pytest.CaptureFixture[str], tmp_path: Path
    ) -> None:
        missing = tmp_path / "typo.db"
        status, out, err = run(capsys, "--store", f"sqlite:///{missing}")
        assert (status, out) == (1, "")
        assert f"names the SQLite file {missing}, which does not exist" in err and err.endswith(".\n")
        assert not missing.exists()

    def test_unreachable_redis_exits_1_without_the_password(self, capsys: pytest.CaptureFixture[str]) -> None:
        from wsgi_proxy.tools.launch import free_port

        status, out, err = run(capsys, "--store", f"redis://:s3cretpass@127.0.0.1:{free_port()}/0")
        assert (status, out) == (1, "")
        assert "could not read the usage totals" in err and "s3cretpass" not in err

    def test_redis_store(self, capsys: pytest.CaptureFixture[str], redis_server: str) -> None:
        from wsgi_proxy.store.redis_store import RedisStore

        with RedisStore(redis_server) as store:
            usage = Usage(input_tokens=3, output_tokens=4, total_tokens=7)
            entry = UsageEntry("resp_cli", "ci", "search", "gpt-4o", "openai", "flex", usage, 1_500)
            store.record_usage(entry, at=noon("1999-12-31"))
        status, out, _ = run(
            capsys, "--store", redis_server, "--until", "1999-12-31", "--by", "team,tier", "--format", "csv"
        )
        assert (status, out) == (
            0,
            f"team,tier,{','.join(COLUMNS)}\nsearch,flex,1,3,0,0,0,0,4,0,0,7,0,0,0,0,0.000001500,0\n",
        )
