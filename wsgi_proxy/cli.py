"""The ``wsgi-proxy`` command: ``demo``, ``check-config`` and ``simulate``.

The proxy itself is served by gunicorn (``gunicorn -c gunicorn.conf.py``); see the README.
"""

from __future__ import annotations

import argparse
import sys
import typing as t

__all__ = ["main"]


def _simulate(args: argparse.Namespace) -> int:
    from .simulator import SimulatorConfig, serve

    config = SimulatorConfig(
        api_key=args.api_key, delay_ms=args.delay_ms, flavor=args.flavor, api_version=args.api_version
    )
    serve(args.host, args.port, config)
    return 0


def _check_config(args: argparse.Namespace) -> int:
    from .config import ConfigError
    from .configfile import load_config_file

    try:
        config = load_config_file(args.path)
    except ConfigError as exc:
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
    simulate.set_defaults(run=_simulate)

    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
