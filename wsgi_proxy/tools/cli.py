"""The ``wsgi-proxy`` command: ``demo``, ``check-config``, ``simulate``, ``usage``, ``keys`` and
``budgets``.

The proxy itself is served by gunicorn (``gunicorn -c gunicorn.conf.py``); see the README.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import typing as t

__all__ = ["main"]


def _simulate(args: argparse.Namespace) -> int:
    from ..simulator import SimulatorConfig, serve

    config = SimulatorConfig(
        api_key=args.api_key,
        delay_ms=args.delay_ms,
        flavor=args.flavor,
        api_version=args.api_version,
        shared_writer=args.shared_writer,
    )
    serve(args.host, args.port, config)
    return 0


def _check_config(args: argparse.Namespace) -> int:
    from ..config import GatewayConfig, ProxySettings
    from ..config.file import load_config_file
    from ..config.settings import ConfigError
    from ..store import StoreError, check_store

    try:
        config = load_config_file(args.path)
        # As gunicorn.conf.py does before any worker starts: keys resolved, the store opened once.
        store_url = GatewayConfig.from_settings(ProxySettings.load({"config": args.path})).store_url
        if store_url is not None:
            check_store(store_url)
    except (ConfigError, StoreError) as exc:
        print(f"wsgi-proxy: {exc}", file=sys.stderr)
        return 2

    def count(n: int, word: str) -> str:
        return f"{n} {word}{'' if n == 1 else 's'}"

    print(
        f"{args.path} is valid: {count(len(config.upstreams), 'upstream')},"
        f" {count(len(config.models), 'model route')}, {count(len(config.teams), 'team')},"
        f" {count(len(config.keys), 'key')}."
    )
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(serve=args.serve, cut_after=args.cut_after)


def _usage(args: argparse.Namespace) -> int:
    from ..config.settings import ConfigError
    from ..store import StoreError, open_store
    from ..store.base import check_day
    from .usage import check_group_by, render_csv, render_json, render_table

    try:
        group_by = check_group_by([part.strip() for part in args.by.split(",") if part.strip()])
        check_day("--since", args.since)
        check_day("--until", args.until)
        if args.since and args.until and args.since > args.until:
            raise ValueError(f"--since {args.since} is after --until {args.until}; swap the two dates.")
        url = _usage_store_url(args.store, args.config, os.environ)
    except (ValueError, ConfigError) as exc:
        print(f"wsgi-proxy: {exc}", file=sys.stderr)
        return 2
    try:
        # create=False: a mistyped path must be an error, not a report on a new, empty file.
        with open_store(url, create=False) as store:
            rows = store.usage_totals(since=args.since, until=args.until)
    except StoreError as exc:
        print(f"wsgi-proxy: {exc}", file=sys.stderr)
        return 1
    render = {"table": render_table, "csv": render_csv, "json": render_json}[args.format]
    sys.stdout.write(render(rows, group_by))
    if not rows:
        print("wsgi-proxy: The store holds no token usage for those days.", file=sys.stderr)
    return 0


def _usage_store_url(store: str | None, config: str | None, environ: t.Mapping[str, str]) -> str:
    """The store to report on: ``--store``, else WSGI_PROXY_STORE_URL, else the file's ``store_url``."""
    import tomllib
    from pathlib import Path

    from ..config.file import load_config_file
    from ..config.gateway import default_store_url
    from ..config.settings import ConfigError

    if store and store.strip():
        return store
    if environ.get("WSGI_PROXY_STORE_URL", "").strip():
        return environ["WSGI_PROXY_STORE_URL"]
    path = config or environ.get("WSGI_PROXY_CONFIG", "").strip()
    if not path:
        raise ConfigError(
            "No store is named, so there is no usage to report: pass --store URL (such as"
            " sqlite:///var/lib/wsgi-proxy/state.db or redis://host:6379/0), set WSGI_PROXY_STORE_URL,"
            " or name the gateway's configuration file with --config or WSGI_PROXY_CONFIG."
        )
    try:
        url = load_config_file(path, environ).store_url
    except ConfigError as exc:
        # The report needs store_url alone, and the secrets the file names by environment
        # variable are rarely exported where reports are run: read just that key.
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            raise exc from None
        url = raw.get("store_url")
        if url is not None and not isinstance(url, str):
            raise ConfigError(
                f"The configuration file {path!r} sets store_url to {url!r}, which is not a URL;"
                ' write it as a string such as "redis://host:6379/0", or pass --store.'
            ) from None
    if not url or not url.strip():
        raise ConfigError(
            f"The configuration file {path!r} sets no store_url, so the gateway keeps its state in"
            f" {default_store_url()} on the host it runs on: pass --store with that URL there,"
            " or set store_url in the file."
        )
    return url


def _file_config(config: str | None, environ: t.Mapping[str, str]) -> t.Any:
    """The configuration file, validated as the gateway validates it, but without the secrets it
    names by environment variable (they need not be exported where keys and budgets are managed)."""
    import tomllib
    from pathlib import Path

    from pydantic import ValidationError

    from ..config.file import FileConfig
    from ..config.settings import ConfigError

    path = config or environ.get("WSGI_PROXY_CONFIG", "").strip()
    if not path:
        raise ConfigError(
            "Keys and budgets belong to the teams of the gateway's configuration file: name it with"
            " --config or WSGI_PROXY_CONFIG."
        )
    try:
        return FileConfig.model_validate(tomllib.loads(Path(path).read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, ValidationError) as exc:
        raise ConfigError(
            f"The configuration file {path!r} could not be read ({type(exc).__name__}); check it with"
            " wsgi-proxy check-config."
        ) from None


def _budgets(args: argparse.Namespace) -> int:
    import time

    from ..config.settings import ConfigError
    from ..store import StoreError, open_store
    from .budgets import budget_rows, render_budgets

    try:
        config = _file_config(args.config, os.environ)
        url = _usage_store_url(args.store, args.config, os.environ)
        with open_store(url, create=False) as store:
            rows = budget_rows(config, store, time.time())
    except ConfigError as exc:
        print(f"wsgi-proxy: {exc}", file=sys.stderr)
        return 2
    except StoreError as exc:
        print(f"wsgi-proxy: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(render_budgets(rows, args.format))
    if not rows:
        print("wsgi-proxy: No team or key of the configuration file has a budget.", file=sys.stderr)
    return 0


def _keys(args: argparse.Namespace) -> int:
    import time

    from ..config.settings import ConfigError
    from ..store import StoreError, open_store
    from . import keys as tool

    limits = {
        name: getattr(args, name, None)
        for name in (
            "rpm",
            "max_streams",
            "tpm",
            "tokens_per_day",
            "tokens_per_month",
            "usd_per_day",
            "usd_per_month",
        )
    }
    if getattr(args, "models", None):
        limits["models"] = [m.strip() for m in args.models.split(",") if m.strip()]
    try:
        url = _usage_store_url(args.store, args.config, os.environ)
        expires_at = None
        if getattr(args, "expires", None):
            expires_at = tool.parse_moment(args.expires, "--expires")
        if getattr(args, "expires_in", None):
            expires_at = time.time() + tool.parse_duration(args.expires_in, "--expires-in")
        grace = tool.parse_duration(args.grace, "--grace") if args.action == "rotate" else 0.0
        file = _file_config(args.config, os.environ) if args.action == "create" else None
        teams = list(file.teams) if file is not None else []
        file_keys = [key.name for key in file.keys] if file is not None else []
        with open_store(url, create=False) as store:
            if args.action == "create":
                secret = tool.create_key(
                    store,
                    args.name,
                    args.team,
                    teams=teams,
                    file_keys=file_keys,
                    limits={k: v for k, v in limits.items() if v is not None},
                    expires_at=expires_at,
                )
                print(secret)
            elif args.action == "rotate":
                print(tool.rotate_key(store, args.name, grace_s=grace, expires_at=expires_at))
            elif args.action == "revoke":
                tool.revoke_key(store, args.name, hint=args.hint)
            elif args.action == "list":
                sys.stdout.write(tool.render_keys(store.list_keys(), args.format, time.time()))
            else:
                for line in store.audit_log():
                    print(json.dumps(line, separators=(",", ":")))
    except (ValueError, ConfigError) as exc:
        print(f"wsgi-proxy: {exc}", file=sys.stderr)
        return 2
    except StoreError as exc:
        print(f"wsgi-proxy: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: t.Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = argparse.ArgumentParser(prog="wsgi-proxy", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo",
        help="play the background-stream resume scenario through the proxy, in front of the simulator",
    )
    demo.add_argument(
        "--serve", action="store_true", help="leave the proxy running afterwards (Ctrl-C stops)"
    )
    demo.add_argument("--cut-after", type=int, default=8, help="drop the connection after this event (8)")
    demo.set_defaults(run=_demo)

    check = commands.add_parser("check-config", help="validate a WSGI_PROXY_CONFIG file and exit")
    check.add_argument("path", help="the TOML file")
    check.set_defaults(run=_check_config)

    simulate = commands.add_parser("simulate", help="run the Responses API simulator alone")
    simulate.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    simulate.add_argument("--port", type=int, default=8001, help="port to bind (8001; 0 picks a free one)")
    simulate.add_argument("--api-key", default=None, help="require this key from clients (none)")
    simulate.add_argument("--delay-ms", type=float, default=20.0, help="time between generated events (20)")
    simulate.add_argument(
        "--flavor",
        choices=["openai", "azure-v1", "azure-legacy"],
        default="openai",
        help="the wire to speak: OpenAI (/v1), Azure v1 (/openai/v1) or Azure legacy (/openai?api-version=)",
    )
    simulate.add_argument(
        "--api-version", default="2025-04-01-preview", help="the api-version azure-legacy requires"
    )
    simulate.add_argument(
        "--shared-writer",
        action="store_true",
        help="write plain background streams from one thread, to hold tens of thousands at once",
    )
    simulate.set_defaults(run=_simulate)

    usage = commands.add_parser(
        "usage",
        help="report the tokens, tool calls and cost per day, team, key and model, from the gateway's store",
        description="Report the tokens, tool calls and cost per day, team, key, model, upstream and"
        " service tier, from the gateway's store."
        " The store is --store, else WSGI_PROXY_STORE_URL, else the store_url of the configuration"
        " file (--config, else WSGI_PROXY_CONFIG). Days are UTC dates.",
    )
    usage.add_argument("--store", metavar="URL", help="the store: sqlite:///path.db or redis://host:6379/0")
    usage.add_argument("--config", metavar="PATH", help="read store_url from this configuration file")
    usage.add_argument("--since", metavar="YYYY-MM-DD", help="the first day to report (inclusive)")
    usage.add_argument("--until", metavar="YYYY-MM-DD", help="the last day to report (inclusive)")
    usage.add_argument(
        "--by",
        default="day,team,key,model",
        metavar="COLUMNS",
        help="the columns to group by, in order, from day,team,key,model,upstream,tier; the others"
        " are added up (day,team,key,model)",
    )
    usage.add_argument(
        "--format", choices=["table", "csv", "json"], default="table", help="the output format (table)"
    )
    usage.set_defaults(run=_usage)

    keys = commands.add_parser(
        "keys",
        help="make, list, rotate and revoke client keys kept in the store (keys_in_store = true)",
        description="Client keys kept in the gateway's store, for a configuration file with keys_in_store ="
        " true: no file to edit, nothing to restart; a revoked key is refused everywhere within"
        " WSGI_PROXY_KEY_CACHE_TTL seconds. Secrets are printed once, on standard output; each change"
        " is an audit line on standard error and in the store. The store is --store, else"
        " WSGI_PROXY_STORE_URL, else the store_url of the configuration file.",
    )
    actions = keys.add_subparsers(dest="action", required=True)

    def keys_command(name: str, help: str) -> argparse.ArgumentParser:
        command = actions.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".")
        command.add_argument(
            "--store", metavar="URL", help="the store: sqlite:///path.db or redis://host:6379/0"
        )
        command.add_argument("--config", metavar="PATH", help="the gateway's configuration file")
        command.set_defaults(run=_keys)
        return command

    def expiry(command: argparse.ArgumentParser) -> None:
        ends = command.add_mutually_exclusive_group()
        ends.add_argument("--expires", metavar="WHEN", help="a UTC date or date and time it stops working")
        ends.add_argument("--expires-in", metavar="DURATION", help="how long it works: 90s, 15m, 12h, 30d")

    create = keys_command("create", "make a key in a team, and print its secret once")
    create.add_argument("name", help="the key's name (in logs, usage and budgets)")
    create.add_argument("--team", required=True, help="one of the configuration file's teams")
    expiry(create)
    for option, kind, what in (
        ("--rpm", int, "requests per minute"),
        ("--max-streams", int, "concurrent open streams"),
        ("--tpm", int, "tokens per minute"),
        ("--tokens-per-day", int, "tokens per UTC day"),
        ("--tokens-per-month", int, "tokens per UTC month"),
        ("--usd-per-day", float, "US dollars per UTC day"),
        ("--usd-per-month", float, "US dollars per UTC month"),
    ):
        create.add_argument(option, type=kind, metavar="N", help=f"the key's own limit of {what}")
    create.add_argument("--models", metavar="PATTERNS", help="the models it may use, such as gpt-4o*,o4-*")
    rotate = keys_command(
        "rotate", "give a key a new secret (printed once); the old ones work for --grace more"
    )
    rotate.add_argument("name")
    rotate.add_argument(
        "--grace", default="1h", metavar="DURATION", help="how long the old secrets still work (1h)"
    )
    expiry(rotate)
    revoke = keys_command("revoke", "stop a key's secrets working, everywhere, within seconds")
    revoke.add_argument("name")
    revoke.add_argument(
        "--hint",
        metavar="...LAST4",
        help="only the secret ending in these four characters, written as keys list shows them",
    )
    listing = keys_command("list", "list the stored keys and the state of each secret")
    listing.add_argument(
        "--format", choices=["table", "json"], default="table", help="the output format (table)"
    )
    keys_command("audit", "print the audit log of key changes, oldest first, one JSON line each")

    budgets = commands.add_parser(
        "budgets",
        help="show every budget of the teams and keys, with what is used and left now",
        description="Every token and cost budget of the configuration file's teams and keys (and of the"
        " keys kept in the store), with what is used of it now, what is left and when it resets (UTC).",
    )
    budgets.add_argument("--store", metavar="URL", help="the store: sqlite:///path.db or redis://host:6379/0")
    budgets.add_argument("--config", metavar="PATH", help="the gateway's configuration file")
    budgets.add_argument(
        "--format", choices=["table", "json"], default="table", help="the output format (table)"
    )
    budgets.set_defaults(run=_budgets)

    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
