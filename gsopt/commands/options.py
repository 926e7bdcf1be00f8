"""One vocabulary for the commands' options: each is defined once here, so it reads, defaults
and fails the same way in every command that takes it."""

from __future__ import annotations

import argparse
import math
import sys

from gsopt.errors import GsoptError
from gsopt.runtime import CPU_MODEL, CUDA_MODEL, DEFAULT_RECIPE

MODEL_RULE = f"default: {CUDA_MODEL} on CUDA, {CPU_MODEL} on a CPU (variants have random weights)"


def add_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", metavar="DIR|VARIANT", help=f"checkpoint folder or variant ({MODEL_RULE})"
    )


def add_device(parser: argparse.ArgumentParser, dtype_list: bool = False) -> None:
    parser.add_argument(
        "--device", metavar="cpu|cuda", help="cpu, cuda or cuda:N (default: cuda if available)"
    )
    parser.add_argument(
        "--dtype",
        metavar="float32|bfloat16|float16" + (",..." if dtype_list else ""),
        help=("comma list of " if dtype_list else "")
        + "weight dtype (default: bfloat16 on CUDA, float32 on a CPU)",
    )


def add_recipe(
    parser: argparse.ArgumentParser, default: str | None = None, required: bool = False
) -> None:
    """`--recipe NAME[,NAME...]` (a built-in name or a .toml path each); `--recipes` is the
    same option. The value stays None when not given, so a command can say the default ran."""
    parser.add_argument(
        "--recipe",
        "--recipes",
        dest="recipe",
        required=required,
        metavar="NAME[,NAME...]",
        help="built-in recipe names or .toml files, comma-separated"
        + (f" (default {default})" if default else ""),
    )


def recipe_list(text: str | None, default: str = DEFAULT_RECIPE) -> list[str]:
    """The --recipe value as names, in order; repeats refused."""
    names = [n.strip() for n in (text or default).split(",") if n.strip()]
    if not names:
        raise GsoptError("--recipe: name at least one recipe, e.g. best")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise GsoptError(f"--recipe: {repeated[0]!r} is named twice")
    return names


def one_recipe(text: str | None, command: str, default: str = DEFAULT_RECIPE) -> str:
    names = recipe_list(text, default)
    if len(names) > 1:
        raise GsoptError(
            f"--recipe: {command} runs one recipe, got {len(names)} ({text}); gsopt apply, "
            "bench and eval compare several"
        )
    return names[0]


def add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the result as JSON on stdout instead of text (files are written as usual)",
    )


def add_batch_size(parser: argparse.ArgumentParser, help: str, default=None, **kwargs) -> None:
    parser.add_argument("--batch-size", default=default, metavar="N", help=help, **kwargs)


def add_draft_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--draft-model",
        metavar="DIR|VARIANT",
        help="the draft model of a recipe that drafts with one (speculative-draft); it must "
        "share the model's tokenizer",
    )


def add_resume_anyway(parser) -> None:
    parser.add_argument(
        "--resume-anyway",
        action="store_true",
        help="resume an --out written under other settings (model, recipe, prompt, budget, "
        "gsopt version), mixing their results",
    )


def add_memory_check(parser) -> None:
    parser.add_argument(
        "--no-memory-check",
        dest="memory_check",
        action="store_false",
        help="load even when the model looks too large for the memory available",
    )


def warn_unused_draft(args: argparse.Namespace, recipes: list, command: str) -> None:
    """--draft-model with no recipe that drafts with a model would be silently ignored."""
    if args.draft_model is not None and not any(r.drafts_with_model for r in recipes):
        print(
            f"gsopt {command}: warning: --draft-model is ignored: no recipe given drafts with "
            "a model (speculative-draft does)",
            file=sys.stderr,
        )


def add_quiet(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quiet", action="store_true", help="no progress bar and no notes on stderr"
    )


def recipe_files(names: list[str]) -> list[str]:
    """The recipes given as files (inputs an output must not overwrite)."""
    return [name for name in names if name.endswith(".toml")]


def numbers(flag: str, text: str, kind: type, minimum: float, above: bool = False) -> list:
    """A comma list of finite numbers, each at least `minimum` (`above`: more than it)."""
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise GsoptError(f"{flag} {text!r}: expected comma-separated numbers") from None
    low = (lambda v: v <= minimum) if above else (lambda v: v < minimum)
    if not values or any(not math.isfinite(v) or low(v) for v in values):
        bound = f"above {minimum}" if above else f"at least {minimum}"
        raise GsoptError(f"{flag} {text!r}: every value must be a finite number {bound}")
    return values


def at_least(flag: str, value: int | float, minimum: int | float) -> None:
    if value < minimum:
        raise GsoptError(f"{flag} must be at least {minimum}, got {value}")


def add_max_new_tokens(parser: argparse.ArgumentParser, default: int) -> None:
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=default,
        metavar="N",
        help="most tokens generated per file",
    )


def add_batch_seconds(parser, default: float | None, where: str = "") -> None:
    parser.add_argument(
        "--batch-seconds",
        type=float,
        default=default,
        metavar="S",
        help=f"most padded audio seconds per batch (clips x the longest){where}",
    )
