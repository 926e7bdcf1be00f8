"""gsopt: transcribe speech with IBM's Granite Speech, and make it fast stage by stage.

Each command lives in its own module (`gsopt.commands`) and adds its own parser; only the
command that runs is imported, so `gsopt report` (JSON to markdown) starts without torch.
User mistakes (`GsoptError`) print as one line on stderr with exit status 2; Ctrl-C prints
`interrupted` and exits 130; bugs still raise with a traceback.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import logging
import os
import sys
import warnings
from importlib.metadata import version

from gsopt.errors import GsoptError

# command -> (module with `add_parser(subparsers, name, help)`, its one-line help)
COMMANDS = {
    "transcribe": ("gsopt.commands.transcribe", "transcribe audio files"),
    "apply": ("gsopt.commands.apply", "apply a recipe; check and time it against eager"),
    "bench": ("gsopt.commands.bench", "sweep recipes against transformers; write JSON"),
    "report": ("gsopt.commands.report", "markdown + PNG charts from bench JSON"),
    "explain": (
        "gsopt.commands.explain",
        "graphs, graph breaks and recompiles per stage, vs transformers",
    ),
    "eval": ("gsopt.commands.evaluate", "word error rate of recipes against references"),
    "serve": ("gsopt.commands.serve", "serve OpenAI's transcription API, continuously batched"),
}

DESCRIPTION = (
    "Transcribe speech with IBM's Granite Speech on IBM's Foundation Model Stack, and make "
    "it fast: apply a recipe (compiled stages, CUDA graphs, Triton attention, a static KV "
    "cache, speculative decoding, quantized weights), check it against eager, time it."
)


class _Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default in its help, unless the help already says it (or it has none)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, argparse.SUPPRESS, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _OneLine(argparse.ArgumentParser):
    """A usage mistake is one line, as every other user error is (argparse prints the whole
    usage block first; --help still shows it)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parser_for(argv: list[str]) -> argparse.ArgumentParser:
    """The parser, with the named command's options added (the others list their help)."""
    parser = _OneLine(prog="gsopt", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"gsopt {version('gsopt')}")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show the libraries' import-time warnings (torchao's missing CUDA kernels, "
        "torch's pytree notices), which gsopt otherwise silences",
    )
    subparsers = parser.add_subparsers(
        dest="command",
        required=True,
        parser_class=functools.partial(_OneLine, formatter_class=_Defaults),
    )
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help) in COMMANDS.items():
        if name == chosen:
            importlib.import_module(module).add_parser(subparsers, name, help)
        else:
            subparsers.add_parser(name, help=help)
    return parser


# Loggers that speak at import time about things a user of gsopt cannot act on: torchao's
# CUDA-only extensions that a CPU build cannot load, torch's notes on deprecated pytree calls.
NOISY_LOGGERS = ("torchao", "torch.utils._pytree")


def quiet_libraries() -> None:
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    # torch's AOT cache asks every tensor subclass (torchao's quantized weights) for a hash.
    warnings.filterwarnings("ignore", message=".*_stable_hash_for_caching.*")


def speak_once(command: str) -> None:
    """gsopt's own log lines as `gsopt COMMAND: ...`, from one process of a torchrun job."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{command}: %(message)s"))
    log = logging.getLogger("gsopt")
    log.handlers[:] = [handler]
    log.setLevel(logging.WARNING if os.environ.get("RANK", "0") == "0" else logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = "gsopt"
    try:
        try:
            args = parser_for(argv).parse_args(argv)
        except SystemExit as done:  # --help, --version, or a usage mistake (one line)
            return done.code if isinstance(done.code, int) else 2
        command = f"gsopt {args.command}"
        speak_once(command)
        if not args.verbose:
            quiet_libraries()
        return args.run(args) or 0
    except GsoptError as e:
        print(f"{command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as e:
        if not _out_of_memory(e):
            raise
        print(
            f"{command}: error: out of memory ({str(e).splitlines()[0][:120]}); use --dtype "
            "bfloat16, a smaller variant or a smaller --batch-size",
            file=sys.stderr,
        )
        return 2


def _out_of_memory(error: BaseException) -> bool:
    """An allocator's failure (host or CUDA), which a user fixes with a smaller model or
    batch, not a bug."""
    if isinstance(error, MemoryError):
        return True
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(error, torch.OutOfMemoryError):
        return True
    return "can't allocate memory" in str(error) or "out of memory" in str(error).lower()
