"""Usage reports: the renderers as tables of cases, and ``wsgi-proxy usage`` against a real SQLite store."""

from __future__ import annotations

import datetime
import json
import textwrap
import typing as t
from pathlib import Path

import pytest

from wsgi_proxy.store import UsageRow
from wsgi_proxy.store.sqlite import SQLiteStore
from wsgi_proxy.tools.cli import main
from wsgi_proxy.tools.usage import check_group_by, render_csv, render_json, render_table

ROWS = [
    UsageRow("2025-01-30", "ci", "search", "gpt-4o", 2, 1200, 300, 1500),
    UsageRow("2025-01-30", None, None, None, 1, 10, 5, 15),
    UsageRow("2025-01-31", "bob", "ads", "gpt-4o-mini", 3, 1_000_000, 20, 1_000_020),
    UsageRow("2025-01-31", "ci", "search", "gpt-4o", 1, 100, 50, 150),
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
                day         team    key  model        responses      input  output      total
                ----------  ------  ---  -----------  ---------  ---------  ------  ---------
                2025-01-30  -       -    -                    1         10       5         15
                2025-01-30  search  ci   gpt-4o               2      1,200     300      1,500
                2025-01-31  ads     bob  gpt-4o-mini          3  1,000,000      20  1,000,020
                2025-01-31  search  ci   gpt-4o               1        100      50        150
                ----------  ------  ---  -----------  ---------  ---------  ------  ---------
                total                                         7  1,001,310     375  1,001,685
                """,
            ),
            (
                ["team"],
                """
                team    responses      input  output      total
                ------  ---------  ---------  ------  ---------
                -               1         10       5         15
                ads             3  1,000,000      20  1,000,020
                search          3      1,300     350      1,650
                ------  ---------  ---------  ------  ---------
                total           7  1,001,310     375  1,001,685
                """,
            ),
            (
                ["model", "day"],
                """
                model        day         responses      input  output      total
                -----------  ----------  ---------  ---------  ------  ---------
                -            2025-01-30          1         10       5         15
                gpt-4o       2025-01-30          2      1,200     300      1,500
                gpt-4o       2025-01-31          1        100      50        150
                gpt-4o-mini  2025-01-31          3  1,000,000      20  1,000,020
                -----------  ----------  ---------  ---------  ------  ---------
                total                            7  1,001,310     375  1,001,685
                """,
            ),
            (
                ["key"],
                """
                key    responses      input  output      total
                -----  ---------  ---------  ------  ---------
                -              1         10       5         15
                bob            3  1,000,000      20  1,000,020
                ci             3      1,300     350      1,650
                -----  ---------  ---------  ------  ---------
                total          7  1,001,310     375  1,001,685
                """,
            ),
            (
                [],
                """
                       responses      input  output      total
                -----  ---------  ---------  ------  ---------
                total          7  1,001,310     375  1,001,685
                """,
            ),
        ],
    )
    def test_groups(self, group_by: list[str], expected: str) -> None:
        assert render_table(ROWS, group_by) == dedent(expected)

    def test_no_rows_is_a_zero_total(self) -> None:
        assert render_table([], ["day", "team"]) == dedent(
            """
            day    team  responses  input  output  total
            -----  ----  ---------  -----  ------  -----
            total                0      0       0      0
            """
        )

    def test_accepts_any_iterable_once(self) -> None:
        assert render_table(iter(ROWS), ("day",)) == render_table(ROWS, ["day"])


class TestCsv:
    @pytest.mark.parametrize(
        ("group_by", "expected"),
        [
            (
                ["day", "team", "key", "model"],
                """
                day,team,key,model,responses,input_tokens,output_tokens,total_tokens
                2025-01-30,,,,1,10,5,15
                2025-01-30,search,ci,gpt-4o,2,1200,300,1500
                2025-01-31,ads,bob,gpt-4o-mini,3,1000000,20,1000020
                2025-01-31,search,ci,gpt-4o,1,100,50,150
                """,
            ),
            (
                ["key", "team"],
                """
                key,team,responses,input_tokens,output_tokens,total_tokens
                ,,1,10,5,15
                bob,ads,3,1000000,20,1000020
                ci,search,3,1300,350,1650
                """,
            ),
            (
                ["day"],
                """
                day,responses,input_tokens,output_tokens,total_tokens
                2025-01-30,3,1210,305,1515
                2025-01-31,4,1000100,70,1000170
                """,
            ),
            (
                [],
                """
                responses,input_tokens,output_tokens,total_tokens
                7,1001310,375,1001685
                """,
            ),
        ],
    )
    def test_groups(self, group_by: list[str], expected: str) -> None:
        assert render_csv(ROWS, group_by) == dedent(expected)

    def test_names_are_quoted_when_needed(self) -> None:
        rows = [UsageRow("2025-01-30", 'a,"b"', None, None, 1, 1, 1, 2)]
        assert render_csv(rows, ["key"]).splitlines()[1] == '"a,""b""",1,1,1,2'


class TestJson:
    @pytest.mark.parametrize(
        ("group_by", "rows", "total"),
        [
            (
                ["team", "model"],
                [
                    {
                        "team": None,
                        "model": None,
                        "responses": 1,
                        "input_tokens": 10,
                        "output_tokens": 5,
                        "total_tokens": 15,
                    },
                    {
                        "team": "ads",
                        "model": "gpt-4o-mini",
                        "responses": 3,
                        "input_tokens": 1000000,
                        "output_tokens": 20,
                        "total_tokens": 1000020,
                    },
                    {
                        "team": "search",
                        "model": "gpt-4o",
                        "responses": 3,
                        "input_tokens": 1300,
                        "output_tokens": 350,
                        "total_tokens": 1650,
                    },
                ],
                {"responses": 7, "input_tokens": 1001310, "output_tokens": 375, "total_tokens": 1001685},
            ),
            (
                [],
                [{"responses": 7, "input_tokens": 1001310, "output_tokens": 375, "total_tokens": 1001685}],
                {"responses": 7, "input_tokens": 1001310, "output_tokens": 375, "total_tokens": 1001685},
            ),
        ],
    )
    def test_groups(self, group_by: list[str], rows: list[dict[str, t.Any]], total: dict[str, int]) -> None:
        document = json.loads(render_json(ROWS, group_by))
        assert document == {"group_by": group_by, "rows": rows, "total": total}
        assert list(document["rows"][0]) == [
            *group_by,
            "responses",
            "input_tokens",
            "output_tokens",
            "total_tokens",
        ]

    def test_no_rows(self) -> None:
        zero = {"responses": 0, "input_tokens": 0, "output_tokens": 0, "total_tokens": 0}
        assert json.loads(render_json([], ["day"])) == {"group_by": ["day"], "rows": [], "total": zero}


@pytest.mark.parametrize(
    ("group_by", "message"),
    [
        (["day", "user"], "Usage cannot be grouped by 'user'; choose among day, team, key, model."),
        (["key_name"], "Usage cannot be grouped by 'key_name'; choose among day, team, key, model."),
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
            # Spread the row's tokens over its responses: the first takes what division leaves over.
            for index in range(row.responses):
                share = [row.input_tokens, row.output_tokens, row.total_tokens]
                tokens = [n // row.responses + (n % row.responses if index == 0 else 0) for n in share]
                number += 1
                assert store.record_usage(
                    f"resp_{number}",
                    key_name=row.key_name,
                    team=row.team,
                    model=row.model,
                    input_tokens=tokens[0],
                    output_tokens=tokens[1],
                    total_tokens=tokens[2],
                    at=noon(row.day),
                )
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
        assert out == "day,team,key,model,responses,input_tokens,output_tokens,total_tokens\n"
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
            (["--by", "day,user"], "Usage cannot be grouped by 'user'; choose among day, team, key, model."),
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
            store.record_usage(
                "resp_cli",
                key_name="ci",
                team="search",
                model="gpt-4o",
                input_tokens=3,
                output_tokens=4,
                total_tokens=7,
                at=noon("1999-12-31"),
            )
        status, out, _ = run(
            capsys, "--store", redis_server, "--until", "1999-12-31", "--by", "team", "--format", "csv"
        )
        assert (status, out) == (
            0,
            "team,responses,input_tokens,output_tokens,total_tokens\nsearch,1,3,4,7\n",
        )
