"""``ganengine`` command line: one module per subcommand in this package.

Each subcommand module defines ``register(subparsers)`` (adds its parser, with
``set_defaults(func=run)``) and ``run(args) -> int``. Modules are imported lazily so that
``ganengine info`` works even when an optional dependency of another command is missing.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module in this package
COMMANDS = {
    "train": "train",
    "translate": "translate",
    "sample": "sample",
    "bench": "bench",
    "profile": "profile",
    "evaluate": "evaluate",
    "export": "export",
    "info": "info",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ganengine", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        try:
            mod = importlib.import_module(f"ganengine.cli.{module}")
        except ModuleNotFoundError as exc:
            if exc.name == f"ganengine.cli.{module}":
                continue  # subcommand not part of this build
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unparsed = parser.parse_known_args(argv)
    if unparsed and not getattr(args, "_takes_any", False):  # (parse_args's own error)
        parser.error(f"unrecognized arguments: {' '.join(unparsed)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if args.command != "info":  # (info shows every setting, bad ones included)
        from ganengine import settings

        bad = settings.problems()
        if bad:
            for line in bad:
                print(f"ganengine: error: {line}", file=sys.stderr)
            print("ganengine: fix or unset the variable(s) above; `ganengine info` lists every setting", file=sys.stderr)
            return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
