"""`gsopt transcribe`: audio files in, one line of text per file out (or a JSON list); with
`--manifest`, a resumable corpus run into a JSONL file (`gsopt.transcription.corpus`).

Under torchrun the process group is joined first (`gsopt.model.parallel.join`): `--tp N`
shards the decoder N ways, and a manifest run splits its inputs across the replicas.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from gsopt.commands import options
from gsopt.commands.options import one_recipe, recipe_files, recipe_list
from gsopt.errors import GsoptError
from gsopt.model import parallel
from gsopt.model.family import is_variant
from gsopt.model.loader import load_target
from gsopt.model.memory import check_fits
from gsopt.model.parallel import Layout, join
from gsopt.results import check_output
from gsopt.runtime import DEFAULT_RECIPE
from gsopt.transcription import corpus
from gsopt.transcription.transcriber import (
    DEFAULT_MAX_NEW_TOKENS,
    Transcriber,
    read_files,
    transcribe_files,
)


def add_parser(subparsers, name: str, help: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name,
        help=help,
        description="Transcribe audio files with Granite Speech; one 'path: text' line each "
        "(with several recipes, '[recipe] path: text').",
    )
    parser.add_argument(
        "files",
        nargs="*",
        metavar="FILE",
        help="audio files (WAV, FLAC, OGG, ...; any rate, mono or stereo); none: the bundled "
        "sample",
    )
    options.add_model(parser)
    options.add_recipe(parser, default=DEFAULT_RECIPE)
    options.add_batch_size(
        parser,
        "files per batch (default 1; with --manifest the most per batch, default "
        f"{corpus.DEFAULT_BATCH_SIZE})",
        type=int,
    )
    group = parser.add_argument_group(
        "corpus runs",
        "--manifest FILE --out FILE.jsonl: resumable, batched by duration, one JSON line per "
        "input; under torchrun each replica takes a share",
    )
    group.add_argument(
        "--manifest",
        metavar="FILE|DIR",
        help='JSONL ({"audio": PATH, "text": REFERENCE, "id": ID} a line; paths relative to '
        "its folder) or CSV with those columns, or a folder of audio files (recursive)",
    )
    group.add_argument(
        "--out",
        metavar="FILE.jsonl",
        help="file for a --manifest run's results, one line per input; a rerun skips the ids in it",
    )
    options.add_batch_seconds(
        group, None, f" in a --manifest run (default {corpus.DEFAULT_BATCH_SECONDS:g})"
    )
    options.add_resume_anyway(group)
    options.add_device(parser)
    options.add_max_new_tokens(parser, DEFAULT_MAX_NEW_TOKENS)
    options.add_json(parser)
    parser.add_argument(
        "--prompt",
        metavar="TEXT",
        help="instruction instead of transcription, e.g. 'translate the speech to French'",
    )
    options.add_draft_model(parser)
    parallel.add_argument(parser)
    options.add_memory_check(parser)
    options.add_quiet(parser)
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    names = recipe_list(args.recipe)
    if args.manifest is None:
        manifest_only = (
            ("--out", args.out),
            ("--batch-seconds", args.batch_seconds),
            ("--resume-anyway", args.resume_anyway or None),
        )
        for option, value in manifest_only:
            if value is not None:
                raise GsoptError(f"{option} applies to --manifest runs; add --manifest FILE")
    else:
        check_manifest_options(args)
        one_recipe(args.recipe, "a --manifest run")
    layout = join(args.tp, args.device)
    try:
        if args.manifest is not None:
            return run_manifest(args, names[0], layout)
        return run_files(args, names, layout)
    finally:
        layout.leave()


def _transcriber(args: argparse.Namespace, recipe: str, layout: Layout) -> Transcriber:
    return Transcriber(
        args.model,
        recipe=recipe,
        device=layout.device(args.device),
        dtype=args.dtype,
        max_new_tokens=args.max_new_tokens,
        prompt=args.prompt,
        draft_model=args.draft_model,
        layout=layout,
        memory_check=args.memory_check,
    )


def run_files(args: argparse.Namespace, names: list[str], layout: Layout) -> int:
    """Every file through each recipe; one model load serves them all."""
    if layout.replicas > 1:
        raise GsoptError(
            f"files run on one model: start {args.tp} torchrun process(es) for --tp {args.tp}, "
            f"not {layout.world}; a --manifest run splits its inputs across replicas"
        )
    batch_size = 1 if args.batch_size is None else args.batch_size
    options.at_least("--batch-size", batch_size, 1)
    transcribers = [_transcriber(args, name, layout) for name in names]  # all checked first
    options.warn_unused_draft(args, [t.recipe for t in transcribers], "transcribe")
    first = transcribers[0]
    if args.memory_check:
        rows = min(batch_size, max(1, len(args.files)))
        check_fits(first.source, first.config, first.dtype, first.device, 1 / args.tp, rows)
    paths, waveforms = read_files(args.files, first)
    weights = None
    if len(transcribers) > 1:
        weights = load_target(
            first.source,
            device=first.device,
            dtype=first.dtype,
            layout=layout,
            memory_check=args.memory_check,
        )
    results = {}
    for transcriber in transcribers:
        transcriber.load(weights)
        progress = not args.quiet and layout.rank == 0
        results[transcriber.recipe.name] = transcribe_files(
            transcriber, paths, waveforms, batch_size, progress
        )
        transcriber.pipeline = None  # frees a recipe's copy of the weights
    if layout.rank != 0:  # every shard computed the same tokens; one prints them
        return 0
    note(args, first.source, ", ".join(names))
    if args.json:
        rows = [
            {"recipe": recipe, **result.to_json()}
            for recipe, done in results.items()
            for result in done
        ]
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return 0
    for recipe, done in results.items():
        for result in done:
            label = f"[{recipe}] " if len(results) > 1 else ""
            print(f"{label}{result.path}: {result.text}")
    return 0


def note(args: argparse.Namespace, model: str | os.PathLike, recipes: str) -> None:
    """What ran (unless --quiet), and a warning when the weights are random, on stderr
    (stdout holds only transcripts)."""
    if not args.quiet:
        default = " (the default)" if args.recipe is None else ""
        print(f"gsopt transcribe: recipe {recipes}{default}", file=sys.stderr)
    if is_variant(model):
        print(
            f"gsopt transcribe: note: {str(model)!r} is a variant with random weights, so the "
            "text is gibberish; pass --model DIR for a real checkpoint",
            file=sys.stderr,
        )


def check_manifest_options(args: argparse.Namespace) -> None:
    if args.files:
        raise GsoptError("give audio files or --manifest, not both")
    if args.out is None:
        raise GsoptError("--manifest needs --out FILE.jsonl (results go there; a rerun resumes)")
    if args.json:
        raise GsoptError("--json prints positional files' results; a --manifest run writes --out")


def run_manifest(args: argparse.Namespace, recipe: str, layout: Layout) -> int:
    """A corpus run: exit 0 when every input was transcribed, 1 when some failed (their
    lines carry `error`); under torchrun only rank 0 reports."""
    entries = corpus.read_manifest(args.manifest)
    inputs = [args.manifest, *recipe_files([recipe]), *(entry.audio for entry in entries)]
    out = check_output(args.out, folder=False, inputs=inputs)
    transcriber = _transcriber(args, recipe, layout)
    if layout.rank == 0:
        options.warn_unused_draft(args, [transcriber.recipe], "transcribe")
    batch_size = corpus.DEFAULT_BATCH_SIZE if args.batch_size is None else args.batch_size
    if args.memory_check:
        rows = max(1, min(batch_size, len(entries)))
        config, dtype = transcriber.config, transcriber.dtype
        check_fits(transcriber.source, config, dtype, transcriber.device, 1 / args.tp, rows)
    summary = corpus.run(
        entries,
        out,
        transcriber,
        layout=layout,
        batch_size=batch_size,
        batch_seconds=corpus.DEFAULT_BATCH_SECONDS
        if args.batch_seconds is None
        else args.batch_seconds,
        progress=not args.quiet,
        resume_anyway=args.resume_anyway,
    )
    if summary is None:
        return 0
    note(args, transcriber.source, recipe)
    print(f"gsopt transcribe: {summary.line()}", file=sys.stderr)
    return 1 if summary.failed else 0
