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
from pathlib import Path

from gsopt.audio.files import (
    DEFAULT_MAX_AUDIO_SECONDS,
    SAMPLE_AUDIO,
    check_audio_file,
    check_duration,
)
from gsopt.audio.windows import SEGMENTATIONS, check_chunking
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
from gsopt.transcription import corpus, writers
from gsopt.transcription.longform import LongForm
from gsopt.transcription.prompts import PROMPT_MODES, TASKS, Ask, language_code
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
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        metavar="N",
        help=f"most tokens generated per file (default {DEFAULT_MAX_NEW_TOKENS}); per window "
        "of a long recording (default 200 per 30 s, scaled)",
    )
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
    add_long_form(parser)
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


def add_long_form(parser: argparse.ArgumentParser) -> None:
    asks = parser.add_argument_group(
        "what to ask", "the model cards' prompt forms (--prompt replaces them with its own text)"
    )
    asks.add_argument("--task", choices=TASKS, default="transcribe", help="what to do")
    asks.add_argument("--language", metavar="CODE", help="the speech's language, e.g. en, fr")
    asks.add_argument("--target-language", metavar="CODE", help="--task translate's target")
    asks.add_argument(
        "--keyword",
        action="append",
        default=[],
        metavar="WORD",
        help="a word or phrase to favour (keyword biasing; repeat for more)",
    )
    asks.add_argument(
        "--prompt-mode",
        choices=PROMPT_MODES,
        default="default",
        help="Granite Speech 4.1 Plus: speaker tags or word timestamps, parsed into the "
        "result's speakers or words",
    )
    asks.add_argument("--prefix-text", metavar="TEXT", help="the answer's start (4.1 Plus)")
    cuts = parser.add_argument_group(
        "long recordings",
        "a file longer than --chunk-length (or any run with one of these options) is cut "
        "into windows that run in batches and are stitched back in time order",
    )
    cuts.add_argument(
        "--chunk-length", type=float, default=30.0, metavar="S", help="longest window"
    )
    cuts.add_argument(
        "--chunk-overlap", type=float, default=0.0, metavar="S", help="windows' shared audio"
    )
    cuts.add_argument(
        "--segmentation",
        choices=SEGMENTATIONS,
        default="fixed",
        help="fixed windows cut at the quietest 100 ms before each limit, or Silero VAD's "
        "speech spans",
    )
    cuts.add_argument(
        "--clip-timestamps", metavar="S,S,...", help="start,end,... seconds: only these ranges"
    )
    cuts.add_argument(
        "--max-audio-seconds",
        type=float,
        default=DEFAULT_MAX_AUDIO_SECONDS,
        metavar="S",
        help="longest recording accepted (0: no cap), refused from its header",
    )
    files = parser.add_argument_group("output files", "Whisper's formats, one file per input")
    files.add_argument(
        "-f", "--output-format", choices=writers.CHOICES, help="format (default all)"
    )
    files.add_argument(
        "-o", "--output-dir", metavar="DIR", help="folder for <name>.<format> (default .)"
    )
    files.add_argument("--max-line-width", type=int, metavar="N", help="wrap subtitle lines")
    files.add_argument("--max-line-count", type=int, metavar="N", help="lines per subtitle cue")


def long_form_asked(args: argparse.Namespace) -> bool:
    """Whether an option that only the long-form path serves was given."""
    return (
        args.output_format is not None
        or args.output_dir is not None
        or args.segmentation != "fixed"
        or args.chunk_overlap != 0.0
        or args.chunk_length != 30.0
        or args.clip_timestamps is not None
        or args.prompt_mode != "default"
    )


def _cut(args: argparse.Namespace) -> LongForm:
    return LongForm(
        segmentation=args.segmentation,
        chunk_length=args.chunk_length,
        chunk_overlap=args.chunk_overlap,
        clip_timestamps=args.clip_timestamps,
        max_audio_seconds=args.max_audio_seconds,
        max_new_tokens=args.max_new_tokens,
    )


def _transcriber(args: argparse.Namespace, recipe: str, layout: Layout) -> Transcriber:
    ask = Ask(
        task=args.task,
        language=language_code(args.language, "--language"),
        target_language=language_code(args.target_language, "--target-language"),
        keywords=tuple(args.keyword),
        prompt_mode=args.prompt_mode,
    )
    return Transcriber(
        args.model,
        recipe=recipe,
        device=layout.device(args.device),
        dtype=args.dtype,
        max_new_tokens=args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
        prompt=args.prompt,
        draft_model=args.draft_model,
        layout=layout,
        memory_check=args.memory_check,
        ask=ask,
        prefix_text=args.prefix_text,
    )


def run_files(args: argparse.Namespace, names: list[str], layout: Layout) -> int:
    """Every file through each recipe; one model load serves them all. A file longer than
    --chunk-length, or a run with a long-form option, takes the windowed path."""
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
    paths = [Path(f) for f in args.files] if args.files else [SAMPLE_AUDIO]
    cut = _cut(args)
    check_chunking(cut.chunk_length, cut.chunk_overlap)
    durations = [check_audio_file(path) for path in paths]
    for path, seconds in zip(paths, durations, strict=True):
        check_duration(path, seconds, cut.max_audio_seconds)
    windowed = long_form_asked(args) or max(durations) > cut.chunk_length
    folder, kinds = None, ()
    if args.output_format is not None or args.output_dir is not None:
        kinds = writers.formats(args.output_format or "all")
        folder = check_output(args.output_dir or ".", folder=True, flag="--output-dir")
    if args.memory_check:
        beams = max(t.recipe.num_beams for t in transcribers)  # each row keeps its beams
        rows = min(batch_size, max(1, len(paths))) * beams
        check_fits(first.source, first.config, first.dtype, first.device, 1 / args.tp, rows)
    if windowed:
        waveforms = None
    else:
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
    results: dict[str, list[dict]] = {}
    for transcriber in transcribers:
        transcriber.load(weights)
        progress = not args.quiet and layout.rank == 0
        if windowed:
            batch_seconds = corpus.DEFAULT_BATCH_SECONDS
            done = transcriber.transcribe(
                paths, cut, batch_size=batch_size, batch_seconds=batch_seconds, progress=progress
            )
            rows = [{"path": str(path), **result} for path, result in zip(paths, done, strict=True)]
        else:
            done = transcribe_files(transcriber, paths, waveforms, batch_size, progress)
            rows = [result.to_json() for result in done]
        results[transcriber.recipe.name] = [{"recipe": transcriber.recipe.name, **r} for r in rows]
        transcriber.pipeline = None  # frees a recipe's copy of the weights
    if layout.rank != 0:  # every shard computed the same tokens; one prints them
        return 0
    note(args, first.source, ", ".join(names))
    warned = 0
    for recipe, rows in results.items():
        for row in rows:
            for warning in row.get("warnings", []):
                print(f"gsopt transcribe: warning: {row['path']}: {warning}", file=sys.stderr)
                warned += 1
            if folder is not None:
                name = row["path"] if len(results) == 1 else f"{row['path']}.{recipe}"
                writers.write(row, name, folder, kinds, args.max_line_width, args.max_line_count)
    if args.json:
        print(
            json.dumps([r for rows in results.values() for r in rows], indent=2, ensure_ascii=False)
        )
    else:
        for recipe, rows in results.items():
            for row in rows:
                label = f"[{recipe}] " if len(results) > 1 else ""
                print(f"{label}{row['path']}: {row['text']}")
    return 1 if warned else 0


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
        rows = max(1, min(batch_size, len(entries))) * transcriber.recipe.num_beams
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
        cut=_cut(args),
    )
    if summary is None:
        return 0
    note(args, transcriber.source, recipe)
    print(f"gsopt transcribe: {summary.line()}", file=sys.stderr)
    return 1 if summary.failed else 0
