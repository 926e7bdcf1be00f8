"""`gsopt transcribe`: audio files in, one line of text per file out, with per-stage timings.

Everything the user can get wrong (files, devices, dtypes, clip lengths) is checked before the
model's weights are read, so a typo costs seconds rather than a multi-gigabyte load. Files run
in batches of `batch_size` in the order given; a padded batch gives each clip the text it gets
alone, so the batch size changes speed only. `--manifest` runs a corpus instead
(`gsopt.transcription.corpus`: duration-sorted batches, resumable JSONL output, torchrun ranks).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from gsopt.audio.files import SAMPLE_AUDIO, check_audio_file, load_audio
from gsopt.audio.frontend import HOP_LENGTH, SAMPLE_RATE
from gsopt.engine.ctc_pipeline import CTCPipeline
from gsopt.engine.generate import truncate_at_eos
from gsopt.engine.pipeline import Pipeline
from gsopt.engine.speculate import SpeculationStats
from gsopt.engine.timing import StageTimer
from gsopt.errors import GsoptError
from gsopt.model import tensor_parallel
from gsopt.model.checkpoint import load_config, load_model
from gsopt.model.config import CTC_VARIANTS, VARIANTS, GraniteSpeechConfig, GraniteSpeechCTCConfig
from gsopt.model.tokenizer import decode, load_tokenizer, prompt_ids
from gsopt.recipe.build import Recipe, changes_model, load_draft_model, load_recipe
from gsopt.recipe.build import apply as apply_recipe
from gsopt.runtime import DTYPES, resolve_device, resolve_dtype

log = logging.getLogger(__name__)
DEFAULT_MODEL = "tiny"
DEFAULT_MAX_NEW_TOKENS = 200  # the Granite Speech model cards' setting


@dataclass
class BatchTimings:
    """Wall-clock seconds of one batch, shared by the files in it."""

    index: int
    size: int
    audio_seconds: float
    seconds: float
    stages: dict[str, float]
    decode_steps: int
    speculation: dict | None = None  # drafted/accepted tokens, forwards, relaxed decisions

    @property
    def rtfx(self) -> float:
        """Seconds of audio per second of wall time (higher is better)."""
        return self.audio_seconds / self.seconds


@dataclass
class Transcription:
    """One file's greedy text; `timings` belong to the batch the file ran in."""

    path: str
    text: str
    tokens: list[int]  # generated ids, end-of-text excluded
    prompt_tokens: int
    audio_seconds: float
    timings: BatchTimings

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "text": self.text,
            "audio_seconds": self.audio_seconds,
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": len(self.tokens),
            "batch": {**asdict(self.timings), "rtfx": self.timings.rtfx},
        }


def check_clip_lengths(
    paths: list[Path],
    num_samples: list[int],
    config: GraniteSpeechConfig,
    text_tokens: int,
    max_new_tokens: int,
) -> None:
    """Each clip's audio tokens, the prompt's text tokens and the new tokens must fit the
    decoder's positions; the error names the budget that ran out.

    The limit in seconds follows from the token formula: a clip fits while its encoder frames
    stay within the whole projector windows the budget pays for.
    """
    positions = config.decoder.max_expected_seq_len
    budget = positions - text_tokens - max_new_tokens
    if budget < config.projector.num_queries:
        raise GsoptError(
            f"the {text_tokens}-token prompt and --max-new-tokens {max_new_tokens} leave no "
            f"room for audio in this model's {positions} positions; lower --max-new-tokens"
            + (" or shorten --prompt" if text_tokens > max_new_tokens else "")
        )
    proj = config.projector
    max_frames = budget // proj.num_queries * proj.window_size
    limit_seconds = HOP_LENGTH * (2 * max_frames + 1) / SAMPLE_RATE
    for path, samples in zip(paths, num_samples, strict=True):
        if config.audio_tokens(samples) > budget:
            raise GsoptError(
                f"{path}: {samples / SAMPLE_RATE:.1f} s of audio is longer than this model "
                f"allows ({limit_seconds:.1f} s: {positions} positions minus a "
                f"{text_tokens}-token text prompt and --max-new-tokens {max_new_tokens}); split "
                "the file or lower --max-new-tokens"
            )


def pipeline_for(model, recipe: Recipe | None, tokenizer=None, draft_model=None):
    """Eager stages, or the ones the recipe builds (it may also merge the LoRA or cast);
    `draft_model` for a recipe that drafts with one. A Granite Speech 5.0 (CTC) model gets
    a `CTCPipeline`."""
    kind = Pipeline if hasattr(model, "decoder") else CTCPipeline
    if recipe is None:
        return kind(model, None, tokenizer)
    stages = apply_recipe(model, recipe, draft_model)
    for note in stages.notes:
        log.warning("recipe %s: %s", recipe.name, note)
    return kind(model, stages, tokenizer)


def _run_batch(
    pipeline: Pipeline,
    tokenizer: PreTrainedTokenizerBase,
    template: list[int],
    index: int,
    paths: list[Path],
    waveforms: list[torch.Tensor],
    max_new_tokens: int,
) -> list[Transcription]:
    config = pipeline.model.config
    ctc = isinstance(pipeline, CTCPipeline)
    timer = StageTimer(pipeline.device, per_step=False)  # no sync per token
    pipeline.speculation_stats = SpeculationStats()
    start = time.perf_counter()
    tokens = pipeline(waveforms, template, max_new_tokens, stop_at_eos=True, timer=timer)
    if ctc:  # each row's labels, padded with -1
        rows = [[t for t in row if t >= 0] for row in tokens.tolist()]
    else:
        rows = truncate_at_eos(tokens.cpu(), config.eos_token_id)
    seconds = time.perf_counter() - start
    speculation = getattr(pipeline.stages, "speculation", None)
    timings = BatchTimings(
        index=index,
        size=len(waveforms),
        audio_seconds=sum(len(wave) for wave in waveforms) / SAMPLE_RATE,
        seconds=seconds,
        stages={name: sum(times) for name, times in timer.times.items()},
        decode_steps=0 if ctc else tokens.shape[1] - 1,
        speculation=pipeline.speculation_stats.to_json() if speculation is not None else None,
    )
    results = []
    for path, wave, row in zip(paths, waveforms, rows, strict=True):
        if ctc:
            generated, text, prompt_tokens = row, pipeline.text(row), 0
        else:
            generated = row[:-1] if row and row[-1] == config.eos_token_id else row
            text = decode(tokenizer, generated)
            prompt_tokens = len(template) - 1 + config.audio_tokens(len(wave))
        results.append(
            Transcription(
                path=str(path),
                text=text,
                tokens=generated,
                prompt_tokens=prompt_tokens,
                audio_seconds=len(wave) / SAMPLE_RATE,
                timings=timings,
            )
        )
    return results


class Transcriber:
    """Settings checked and cheap parts read on construction (config, tokenizer, prompt,
    recipe file), the weights only on `load`: a corpus run can refuse bad input, write its
    error records and skip work already done before paying for a multi-gigabyte load."""

    def __init__(
        self,
        model: str | os.PathLike = DEFAULT_MODEL,
        *,
        recipe: str | None = None,
        device: str | torch.device | None = None,
        dtype: str | None = None,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        prompt: str | None = None,
        draft_model: str | os.PathLike | None = None,
        tp: int = 1,
    ):
        """`tp` > 1: the decoder sharded across that many torchrun processes (FMS tensor
        parallelism; `gsopt.model.tensor_parallel.start` joins them first)."""
        if max_new_tokens < 1:
            raise GsoptError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
        self.source = model
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.max_new_tokens = max_new_tokens
        self.config = load_config(model)
        self.tokenizer = load_tokenizer(model, self.config)
        if isinstance(self.config, GraniteSpeechCTCConfig):  # no decoder: no prompt, positions
            if prompt is not None:
                raise GsoptError("--prompt: Granite Speech 5.0 (CTC) takes no prompt; drop it")
            self.template = None
        else:
            self.template = prompt_ids(self.tokenizer, self.config.audio_token_id, prompt)
            self.check_lengths([], [])  # a prompt and budget that leave no room for audio
        self.settings = load_recipe(recipe) if recipe is not None else None
        self.draft_model = draft_model
        self.tp = tp
        self.pipeline: Pipeline | CTCPipeline | None = None

    def check_lengths(self, paths: list[Path], num_samples: list[int]) -> None:
        """Refuse, naming the file, a clip whose audio tokens do not fit the positions."""
        if self.template is not None:
            text_tokens = len(self.template) - 1
            check_clip_lengths(paths, num_samples, self.config, text_tokens, self.max_new_tokens)

    def load(self, weights: torch.nn.Module | None = None) -> None:
        """Read the weights (and the draft model's) and build the recipe's stages; or use
        `weights` already loaded, copied first if the recipe would change them, so the
        caller's model stays as it was (one load serves several recipes)."""
        draft = None
        if self.draft_model is not None:
            draft = load_draft_model(
                self.draft_model,
                self.config,
                device=self.device,
                dtype=self.dtype,
                target_source=self.source,
            )
        if weights is None and self.tp > 1:
            weights = tensor_parallel.load_tensor_parallel(
                self.source, device=self.device, dtype=self.dtype, lora="live"
            )
        elif weights is None:
            weights = load_model(self.source, device=self.device, dtype=self.dtype)
        elif self.settings is not None and changes_model(weights, self.settings):
            weights = copy.deepcopy(weights)
        self.pipeline = pipeline_for(weights, self.settings, self.tokenizer, draft)

    def run_batch(
        self, index: int, paths: list[Path], waveforms: list[torch.Tensor]
    ) -> list[Transcription]:
        """One padded batch; each result equals the clip's alone. Needs `load` first."""
        return _run_batch(
            self.pipeline,
            self.tokenizer,
            self.template,
            index,
            paths,
            waveforms,
            self.max_new_tokens,
        )


def transcribe(
    files: list[str | os.PathLike] | None = None,
    *,
    model: str | os.PathLike = DEFAULT_MODEL,
    recipe: str | None = None,
    batch_size: int = 1,
    device: str | None = None,
    dtype: str | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    prompt: str | None = None,
    progress: bool = False,
    draft_model: str | os.PathLike | None = None,
    tp: int = 1,
) -> list[Transcription]:
    """Greedy transcripts of `files` (the bundled sample when empty), in the order given.

    `model` is a checkpoint folder or a variant name (random weights, synthetic tokenizer);
    `recipe` a built-in recipe name or a .toml path (None: eager stages); `prompt` replaces
    the transcription request (e.g. a translation request). `progress` shows a bar on
    stderr, in seconds of audio, when stderr is a terminal. A recipe's fallbacks on this
    machine are logged as warnings. `draft_model` (a folder or variant sharing the model's
    tokenizer) is the draft of a recipe that drafts with a model; `tp` > 1 shards the
    decoder across that many torchrun processes.
    """
    if batch_size < 1:
        raise GsoptError(f"--batch-size must be at least 1, got {batch_size}")
    transcriber = Transcriber(
        model,
        recipe=recipe,
        device=device,
        dtype=dtype,
        max_new_tokens=max_new_tokens,
        prompt=prompt,
        draft_model=draft_model,
        tp=tp,
    )
    paths = [Path(f) for f in files] if files else [SAMPLE_AUDIO]
    # Durations from the headers first: a file that is too long is refused before it is
    # decoded (a 2-hour 48 kHz file would take gigabytes).
    num_samples = [round(check_audio_file(path) * SAMPLE_RATE) for path in paths]
    transcriber.check_lengths(paths, num_samples)
    waveforms = [load_audio(path) for path in paths]
    transcriber.load()
    results: list[Transcription] = []
    total_seconds = sum(len(wave) for wave in waveforms) / SAMPLE_RATE
    with tqdm(
        total=round(total_seconds, 1),
        unit="s",
        desc="transcribing",
        file=sys.stderr,
        disable=None if progress else True,
    ) as bar:
        for index, start in enumerate(range(0, len(paths), batch_size)):
            batch = slice(start, start + batch_size)
            done = transcriber.run_batch(index, paths[batch], waveforms[batch])
            results.extend(done)
            bar.update(round(done[0].timings.audio_seconds, 1))
    return results


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "transcribe",
        help="transcribe audio files",
        description="Transcribe audio files with Granite Speech; one 'path: text' line each.",
    )
    parser.add_argument(
        "files",
        nargs="*",
        metavar="FILE",
        help="audio files (WAV, FLAC, OGG, ...; any rate, mono or stereo); none: the bundled "
        "sample",
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        metavar="DIR|VARIANT",
        help=f"checkpoint folder, or a variant with random weights ({', '.join(VARIANTS)}); "
        f"default {DEFAULT_MODEL!r}, which prints gibberish",
    )
    parser.add_argument(
        "--recipe",
        metavar="NAME|FILE",
        help="built-in recipe name or .toml file (default: eager stages, static KV cache)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        metavar="N",
        help="files per batch (default 1; with --manifest the most per batch, default 32)",
    )
    corpus = parser.add_argument_group(
        "corpus runs",
        "--manifest FILE --out FILE.jsonl: resumable, batched by duration, one JSON line per "
        "input; under torchrun each process takes a share",
    )
    corpus.add_argument(
        "--manifest",
        metavar="FILE|DIR",
        help='JSONL ({"audio": PATH, "text": REFERENCE, "id": ID} a line; paths relative to '
        "its folder) or CSV with those columns, or a folder of audio files (recursive)",
    )
    corpus.add_argument(
        "--out",
        metavar="FILE.jsonl",
        help="results of a --manifest run, one line per input; a rerun skips the ids in it",
    )
    corpus.add_argument(
        "--batch-seconds",
        type=float,
        metavar="S",
        help="most padded audio seconds per batch (clips x the longest) in a --manifest run "
        "(default 300)",
    )
    parser.add_argument(
        "--device", metavar="cpu|cuda", help="cpu, cuda or cuda:N (default: cuda if available)"
    )
    parser.add_argument(
        "--dtype",
        metavar="|".join(DTYPES),
        help="weight dtype (default: bfloat16 on cuda, float32 on cpu)",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=DEFAULT_MAX_NEW_TOKENS,
        metavar="N",
        help=f"most tokens generated per file (default {DEFAULT_MAX_NEW_TOKENS})",
    )
    parser.add_argument(
        "--json", action="store_true", help="print a JSON list with token counts and timings"
    )
    parser.add_argument(
        "--prompt",
        metavar="TEXT",
        help="instruction instead of transcription, e.g. 'translate the speech to French'",
    )
    parser.add_argument(
        "--draft-model",
        metavar="DIR|VARIANT",
        help="the draft model of a recipe that drafts with one (speculative-draft); it must "
        "share the model's tokenizer",
    )
    tensor_parallel.add_argument(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    if args.tp > 1 and args.manifest is not None:
        raise GsoptError(
            "--tp with --manifest: not supported yet; torchrun a manifest without --tp (each "
            "process a whole model and a share of the files), or --tp with files"
        )
    if args.manifest is not None:
        return run_manifest(args)
    rank = tensor_parallel.start(args.tp)
    for option, value in (("--out", args.out), ("--batch-seconds", args.batch_seconds)):
        if value is not None:
            raise GsoptError(f"{option} applies to --manifest runs; add --manifest FILE")
    results = transcribe(
        args.files,
        model=args.model,
        recipe=args.recipe,
        batch_size=1 if args.batch_size is None else args.batch_size,
        device=args.device,
        dtype=args.dtype,
        max_new_tokens=args.max_new_tokens,
        prompt=args.prompt,
        progress=not args.quiet and rank == 0,
        draft_model=args.draft_model,
        tp=args.tp,
    )
    if rank != 0:  # every shard computed the same tokens; one prints them
        return 0
    random_weights_note(args.model)
    if args.json:
        print(json.dumps([result.to_json() for result in results], indent=2, ensure_ascii=False))
    else:
        for result in results:
            print(f"{result.path}: {result.text}")
    return 0


def random_weights_note(model: str | os.PathLike) -> None:
    if str(model) in VARIANTS or str(model) in CTC_VARIANTS:
        print(
            f"gsopt transcribe: note: {model!r} is a variant with random weights, so the "
            "text is gibberish; pass --model DIR for a real checkpoint",
            file=sys.stderr,
        )


def run_manifest(args: argparse.Namespace) -> int:
    """A corpus run (`gsopt.transcription.corpus`): exit 0 when every input was transcribed,
    1 when some failed (their lines carry `error`); under torchrun only rank 0 reports."""
    from gsopt.transcription import corpus

    if args.files:
        raise GsoptError("give audio files or --manifest, not both")
    if args.out is None:
        raise GsoptError("--manifest needs --out FILE.jsonl (results go there; a rerun resumes)")
    if args.json:
        raise GsoptError("--json prints positional files' results; a --manifest run writes --out")
    entries = corpus.read_manifest(args.manifest)
    ranks = corpus.Ranks.from_env()
    transcriber = Transcriber(
        args.model,
        recipe=args.recipe,
        device=ranks.device(args.device),
        dtype=args.dtype,
        max_new_tokens=args.max_new_tokens,
        prompt=args.prompt,
        draft_model=args.draft_model,
    )
    try:
        summary = corpus.run(
            entries,
            args.out,
            transcriber,
            ranks=ranks,
            batch_size=corpus.DEFAULT_BATCH_SIZE if args.batch_size is None else args.batch_size,
            batch_seconds=corpus.DEFAULT_BATCH_SECONDS
            if args.batch_seconds is None
            else args.batch_seconds,
            progress=not args.quiet,
        )
    finally:
        ranks.leave()
    if summary is None:
        return 0
    random_weights_note(args.model)
    print(f"gsopt transcribe: {summary.line()}", file=sys.stderr)
    return 1 if summary.failed else 0
