"""`gsopt eval`: each recipe's word and character error rates on a manifest with references,
beside eager's, with its speed and its token agreement with eager.

Scoring follows the Open ASR Leaderboard: Whisper's English normaliser (transformers'
`EnglishTextNormalizer`, with OpenAI's British-to-American spelling map where the
`whisper-normalizer` package supplies it, otherwise none) on references and hypotheses
alike; a pair whose reference normalises to nothing is left out, as the leaderboard does;
then jiwer's corpus figures: all edits over all reference words (characters), not a mean of
per-clip rates.

Each recipe runs as a corpus run (`gsopt.transcription.corpus`) into
OUT/transcripts/RECIPE.jsonl, so an eval resumes where it stopped and runs under torchrun
like `transcribe --manifest`. The model is read once; a recipe that changes the weights
(dtype, merged LoRA, quantization) runs on a copy.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from tabulate import tabulate

from gsopt.commands import options
from gsopt.commands.options import recipe_files, recipe_list
from gsopt.errors import GsoptError
from gsopt.model import parallel
from gsopt.model.family import is_variant
from gsopt.model.loader import load_target
from gsopt.model.parallel import join
from gsopt.results import check_output, environment, to_json, write_atomic
from gsopt.runtime import default_model, dtype_name
from gsopt.transcription import corpus
from gsopt.transcription.transcriber import DEFAULT_MAX_NEW_TOKENS, Transcriber

BASELINE = "eager"


@functools.cache
def spelling_mapping() -> tuple[dict[str, str], str]:
    """Whisper's British-to-American spelling map and where it came from. transformers
    reads it from a Whisper tokenizer's normalizer.json, which needs a download; the
    whisper-normalizer package ships the same file."""
    try:
        text = (resources.files("whisper_normalizer") / "normalizers" / "english.json").read_text()
    except (ModuleNotFoundError, FileNotFoundError):
        return {}, "none (install gsopt[eval] for Whisper's British-to-American spelling map)"
    mapping = json.loads(text)
    return mapping, f"whisper-normalizer's english.json ({len(mapping)} spellings)"


@functools.cache
def normalizer():
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    return EnglishTextNormalizer(spelling_mapping()[0])


def _jiwer():
    try:
        import jiwer
    except ModuleNotFoundError:
        raise GsoptError("gsopt eval needs jiwer: pip install 'gsopt[eval]'") from None
    return jiwer


def score(references: list[str], hypotheses: list[str]) -> dict[str, Any]:
    """Corpus WER and CER after Whisper's English normalisation, with the edit counts.
    Pairs whose reference normalises to nothing are counted in `empty_references` and left
    out; with none left, the rates are None."""
    jiwer = _jiwer()
    normalise = normalizer()
    pairs = [(normalise(r), normalise(h)) for r, h in zip(references, hypotheses, strict=True)]
    kept = [(r, h) for r, h in pairs if r.strip()]
    result: dict[str, Any] = {"scored": len(kept), "empty_references": len(pairs) - len(kept)}
    if not kept:
        return result | {"wer": None, "cer": None}
    refs, hyps = [r for r, _ in kept], [h for _, h in kept]
    words = jiwer.process_words(refs, hyps)
    chars = jiwer.process_characters(refs, hyps)
    return result | {
        "wer": words.wer,
        "cer": chars.cer,
        "substitutions": words.substitutions,
        "deletions": words.deletions,
        "insertions": words.insertions,
        "reference_words": words.hits + words.substitutions + words.deletions,
        "reference_chars": chars.hits + chars.substitutions + chars.deletions,
    }


def agreement(baseline: list[list[int]], tokens: list[list[int]]) -> dict[str, float]:
    """`token_agreement`: positions holding the same token, over the longer sequence of each
    pair, summed over clips; `identical`: the share of clips whose tokens equal eager's."""
    pairs = list(zip(baseline, tokens, strict=True))
    positions = sum(max(len(a), len(b)) for a, b in pairs)
    same = sum(x == y for a, b in pairs for x, y in zip(a, b, strict=False))
    identical = sum(a == b for a, b in pairs)
    return {
        "token_agreement": same / positions if positions else 1.0,
        "identical": identical / len(tokens) if tokens else 1.0,
    }


def rtfx(records: list[dict[str, Any]]) -> float | None:
    """Audio seconds per second of transcription, from each clip's share of its batch's
    wall time (so resumed runs and ranks add up); None without timed records."""
    audio = sum(r["duration_s"] for r in records)
    seconds = sum(
        r["timing"]["batch_wall_s"] * r["duration_s"] / r["timing"]["batch_audio_s"]
        for r in records
    )
    return audio / seconds if seconds > 0 else None


def recipe_names(text: str | None) -> list[str]:
    """The --recipe list, eager first (added when absent: every figure is read against it)."""
    names = recipe_list(text, BASELINE)
    return [BASELINE, *(n for n in names if n != BASELINE)]


def transcript_name(recipe: str) -> str:
    """A recipe's transcript file name: a built-in's name, or a .toml file's stem."""
    stem = Path(recipe).stem if recipe.endswith(".toml") else recipe
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem) + ".jsonl"


def report(
    entries: list[corpus.Entry],
    transcripts: dict[str, Path],
    meta: dict[str, Any],
) -> dict[str, Any]:
    """Every recipe scored on the inputs that every recipe transcribed (like with like)."""
    by_recipe = {
        name: {r["id"]: r for r in corpus.read_records(path)} for name, path in transcripts.items()
    }
    ok = {
        name: {key for key, r in records.items() if r.get("error") is None}
        for name, records in by_recipe.items()
    }
    scored = [e for e in entries if all(e.id in ids for ids in ok.values())]
    common, references = [e.id for e in scored], [e.reference for e in scored]
    eager_tokens = [by_recipe[BASELINE][key]["tokens"] for key in common]
    rows = []
    for name, records in by_recipe.items():
        chosen = [records[key] for key in common]
        figures = score(references, [r["text"] for r in chosen])
        rows.append(
            {
                "recipe": name,
                **figures,
                "rtfx": rtfx(chosen),
                **agreement(eager_tokens, [r["tokens"] for r in chosen]),
                "failed": len(entries) - len(ok[name]),
                "transcripts": str(transcripts[name]),
            }
        )
    for row in rows:
        for rate in ("wer", "cer"):
            base = rows[0][rate]
            row[f"{rate}_change"] = None if row[rate] is None or base is None else row[rate] - base
    mapping = spelling_mapping()[1]
    return {
        **meta,
        "inputs": len(entries),
        "scored_inputs": len(common),
        "normalizer": f"Whisper EnglishTextNormalizer (transformers); spelling map: {mapping}",
        "recipes": rows,
    }


def _percent(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:+.2f}" if signed else f"{100 * value:.2f}"


def render_markdown(data: dict[str, Any]) -> str:
    table = tabulate(
        [
            [
                r["recipe"],
                _percent(r["wer"]),
                _percent(r["wer_change"], signed=True),
                _percent(r["cer"]),
                _percent(r["cer_change"], signed=True),
                "-" if r["rtfx"] is None else f"{r['rtfx']:.1f}",
                f"{100 * r['token_agreement']:.1f}%",
                f"{100 * r['identical']:.1f}%",
                r["failed"],
            ]
            for r in data["recipes"]
        ],
        headers=[
            "recipe",
            "WER %",
            "vs eager",
            "CER %",
            "vs eager",
            "RTFx",
            "tokens = eager",
            "clips = eager",
            "failed",
        ],
        tablefmt="github",
        disable_numparse=True,
    )
    lines = [
        f"# gsopt eval: {data['model']} on {data['manifest']}",
        "",
        f"{data['scored_inputs']} of {data['inputs']} inputs scored (those every recipe "
        f"transcribed); {data['environment']['device']}, dtype {data['dtype']}, "
        f"--max-new-tokens {data['max_new_tokens']}.",
        "",
        table,
        "",
        f"Normalised with {data['normalizer']}. WER and CER are corpus figures (all edits over "
        "all reference words or characters); 'vs eager' in percentage points. RTFx: audio "
        "seconds per second of transcription, first (compiling) batches included.",
    ]
    for note in data["notes"]:
        lines += ["", f"Note: {note}"]
    return "\n".join(lines) + "\n"


def add_parser(subparsers, name: str, help: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name,
        help=help,
        description="Transcribe a manifest with each recipe and score it against the "
        "references (Whisper's English normalisation, jiwer's corpus WER and CER), beside "
        "eager: WER, CER, their change from eager, RTFx and token agreement with eager. "
        "Writes OUT/eval.json and OUT/eval.md; transcripts go to OUT/transcripts/ and a rerun "
        "resumes them.",
    )
    parser.add_argument(
        "--manifest",
        required=True,
        metavar="FILE",
        help='JSONL ({"audio": PATH, "text": REFERENCE, "id": ID} a line) or CSV with those '
        "columns; every input needs its reference text",
    )
    options.add_recipe(parser, default=f"{BASELINE} (always run as the baseline)")
    options.add_model(parser)
    parser.add_argument(
        "--out",
        default="gsopt-eval",
        metavar="DIR",
        help="folder for eval.json, eval.md and transcripts/",
    )
    options.add_device(parser)
    options.add_max_new_tokens(parser, DEFAULT_MAX_NEW_TOKENS)
    options.add_batch_size(
        parser, "most files per batch", default=corpus.DEFAULT_BATCH_SIZE, type=int
    )
    options.add_batch_seconds(parser, corpus.DEFAULT_BATCH_SECONDS)
    options.add_draft_model(parser)
    parallel.add_argument(parser)
    options.add_resume_anyway(parser)
    options.add_memory_check(parser)
    options.add_json(parser)
    options.add_quiet(parser)
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Exit 0, or 1 when some input failed in some recipe (its line carries `error`)."""
    _jiwer()
    entries = corpus.read_manifest(args.manifest)
    unreferenced = [e for e in entries if e.reference is None]
    if unreferenced:
        raise GsoptError(
            f"{unreferenced[0].where}: no 'text' (the reference); gsopt eval scores every "
            f"input against its reference, and {len(unreferenced)} of {len(entries)} have none"
        )
    names = recipe_names(args.recipe)
    files = [transcript_name(name) for name in names]
    if len(set(files)) < len(files):
        raise GsoptError(f"--recipes: two recipes share a transcript name ({', '.join(files)})")
    out = check_output(args.out, folder=True, inputs=[args.manifest, *recipe_files(names)])
    layout = join(args.tp, args.device)
    device = layout.device(args.device)
    source = args.model or default_model(device.type)
    try:
        transcribers = {  # every recipe and setting checked before the weights are read
            name: Transcriber(
                source,
                recipe=name,
                device=device,
                dtype=args.dtype,
                max_new_tokens=args.max_new_tokens,
                draft_model=args.draft_model,
                layout=layout,
            )
            for name in names
        }
        if layout.rank == 0:
            options.warn_unused_draft(args, [t.recipe for t in transcribers.values()], "eval")
        transcripts = {n: out / "transcripts" / f for n, f in zip(names, files, strict=True)}
        dtype = transcribers[BASELINE].dtype
        weights = load_target(
            source, device=device, dtype=dtype, layout=layout, memory_check=args.memory_check
        )
        for name, transcriber in transcribers.items():
            if layout.rank == 0:
                print(f"gsopt eval: {name}", file=sys.stderr)
            corpus.run(
                entries,
                transcripts[name],
                transcriber,
                layout=layout,
                batch_size=args.batch_size,
                batch_seconds=args.batch_seconds,
                progress=not args.quiet,
                weights=weights,
                resume_anyway=args.resume_anyway,
            )
            transcriber.pipeline = None  # frees a recipe's copy of the weights
    finally:
        layout.leave()
    if layout.rank != 0:
        return 0
    notes = []
    if is_variant(source):
        notes.append(
            f"{str(source)!r} has random weights: its text is gibberish and its WER "
            "meaningless (the figures test the plumbing); pass --model DIR for a real "
            "checkpoint"
        )
    meta = {
        "manifest": str(args.manifest),
        "model": str(source),
        "dtype": dtype_name(dtype),
        "max_new_tokens": args.max_new_tokens,
        "processes": layout.world,
        "tensor_parallel": layout.tp,
        "environment": environment(device),
        "notes": notes,
    }
    data = report(entries, transcripts, meta)
    markdown = render_markdown(data)
    write_atomic(out / "eval.json", to_json(data))
    write_atomic(out / "eval.md", markdown)
    print(to_json(data) if args.json else markdown, end="")
    print(f"wrote {out / 'eval.json'} and {out / 'eval.md'}", file=sys.stderr)
    failed = {r["recipe"]: r["failed"] for r in data["recipes"] if r["failed"]}
    if failed:
        print(
            "gsopt eval: some inputs failed ("
            + ", ".join(f"{name}: {n}" for name, n in failed.items())
            + "); their transcript lines carry 'error'",
            file=sys.stderr,
        )
    return 1 if failed else 0
