"""`python -m gsopt COMMAND`: each command lives in its own module and adds its own parser.

User mistakes (`GsoptError`) print as one line on stderr with exit status 2; bugs still
raise with a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from gsopt.errors import GsoptError

# command -> module with `add_parser(subparsers)` returning a parser whose default `run` is set
COMMANDS = {
    "transcribe": "gsopt.transcribe",
    "apply": "gsopt.apply",
    "bench": "gsopt.bench",
    "report": "gsopt.report",
    "explain": "gsopt.explain",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gsopt", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS.values():
        importlib.import_module(module).add_parser(subparsers)
    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0
    except GsoptError as e:
        print(f"gsopt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gsopt {args.command}: interrupted", file=sys.stderr)
        return 130
