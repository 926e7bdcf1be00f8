"""gsopt: transcribe speech with IBM's Granite Speech, and make it fast stage by stage.

Each command lives in its own module and adds its own parser. User mistakes (`GsoptError`)
print as one line on stderr with exit status 2; Ctrl-C prints `interrupted` and exits 130;
bugs still raise with a traceback.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import sys
from importlib.metadata import version

from gsopt.errors import GsoptError

# command -> module with `add_parser(subparsers)` returning a parser whose default `run` is set
COMMANDS = {
    "transcribe": "gsopt.transcription.transcriber",
    "apply": "gsopt.commands.apply",
    "bench": "gsopt.commands.bench",
    "report": "gsopt.commands.report",
    "explain": "gsopt.commands.explain",
    "eval": "gsopt.commands.evaluate",
}


DESCRIPTION = (
    "Transcribe speech with IBM's Granite Speech on IBM's Foundation Model Stack, and make "
    "it fast: apply a recipe (compiled stages, CUDA graphs, Triton attention, a static KV "
    "cache, speculative decoding, quantized weights), check it against eager, time it."
)


class _Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default in its help, unless the help already says it (or it has none)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def main(argv: list[str] | None = None) -> int:
    command = "gsopt"
    try:
        parser = argparse.ArgumentParser(prog="gsopt", description=DESCRIPTION)
        parser.add_argument("--version", action="version", version=f"gsopt {version('gsopt')}")
        subparsers = parser.add_subparsers(
            dest="command",
            required=True,
            parser_class=functools.partial(argparse.ArgumentParser, formatter_class=_Defaults),
        )
        for module in COMMANDS.values():
            importlib.import_module(module).add_parser(subparsers)
        args = parser.parse_args(argv)
        command = f"gsopt {args.command}"
        return args.run(args) or 0
    except GsoptError as e:
        print(f"{command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130
