"""Transcription from Python: audio files in, text out, with per-stage timings.

Everything a user can get wrong (files, devices, dtypes, clip lengths, the recipe) is
checked before the model's weights are read, so a typo costs seconds rather than a
multi-gigabyte load. Files run in batches of `batch_size` in the order given; a padded
batch gives each clip the text it gets alone, so the batch size changes speed only.
Corpus runs (`gsopt.transcription.corpus`) drive the same `Transcriber`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from gsopt.audio.files import SAMPLE_AUDIO, check_audio_file, load_audio, read_recording
from gsopt.audio.frontend import HOP_LENGTH, SAMPLE_RATE
from gsopt.audio.windows import check_chunking
from gsopt.engine.generate import truncate_at_eos
from gsopt.engine.speculate import SpeculationStats
from gsopt.engine.timing import StageTimer
from gsopt.errors import GsoptError
from gsopt.model.checkpoint import load_config
from gsopt.model.config import GraniteSpeechConfig
from gsopt.model.family import family_of
from gsopt.model.loader import load_draft_model, load_models
from gsopt.model.parallel import Layout
from gsopt.model.tokenizer import decode, load_tokenizer, prompt_ids
from gsopt.recipe import build_pipeline, load_recipe
from gsopt.recipe.compile import compiles
from gsopt.runtime import DEFAULT_RECIPE, default_model, dtype_name, resolve_device, resolve_dtype
from gsopt.transcription.longform import LongForm, chunk_samples, transcribe_recordings
from gsopt.transcription.prompts import Ask

log = logging.getLogger(__name__)
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
    fix: str = "split the file or lower --max-new-tokens",
) -> None:
    """Each clip's audio tokens, the prompt's text tokens and the new tokens must fit the
    decoder's positions; the error names the budget that ran out (and `fix`, what to do)."""
    # The limit in seconds follows from the token formula: a clip fits while its encoder
    # frames stay within the whole projector windows the budget pays for.
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
                f"{text_tokens}-token text prompt and --max-new-tokens {max_new_tokens}); {fix}"
            )


def _run_batch(
    pipeline,
    tokenizer: PreTrainedTokenizerBase,
    template: list[int],
    index: int,
    paths: list[Path],
    waveforms: list[torch.Tensor],
    max_new_tokens: int,
) -> list[Transcription]:
    config = pipeline.model.config
    ctc = not family_of(pipeline.model).decoder
    timer = StageTimer(pipeline.device, per_step=False)  # no sync per token
    pipeline.speculation_stats = SpeculationStats()
    start = time.perf_counter()
    tokens = pipeline(waveforms, template, max_new_tokens, stop_at_eos=True, timer=timer)
    if ctc:  # each row's labels, padded with -1
        rows = [[t for t in row if t >= 0] for row in tokens.tolist()]
    else:
        rows = truncate_at_eos(tokens.cpu(), config.eos_token_id)
    seconds = time.perf_counter() - start
    speculation = pipeline.stages.plan.speculation
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


def _digest(value: Any) -> str:
    return hashlib.sha256(repr(value).encode()).hexdigest()[:12]


class Transcriber:
    """Settings checked and cheap parts read on construction (config, tokenizer, prompt,
    recipe file), the weights only on `load`: a corpus run can refuse bad input, write its
    error records and skip work already done before paying for a multi-gigabyte load."""

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        *,
        recipe: str = DEFAULT_RECIPE,
        device: str | torch.device | None = None,
        dtype: str | None = None,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        prompt: str | None = None,
        draft_model: str | os.PathLike | None = None,
        layout: Layout | None = None,
        memory_check: bool = True,
        ask: Ask | None = None,
        prefix_text: str | None = None,
    ):
        """`model`: a checkpoint folder or a variant (default: `gsopt.runtime.default_model`);
        `recipe`: a built-in name or a .toml path; `layout`: this process's place under
        torchrun (`gsopt.model.parallel.join`), whose tensor-parallel group shards the
        decoder; `ask`: the task, language, keywords and Plus mode in the model cards'
        forms (`prompt` replaces all of them with its own text); `prefix_text`: the start of
        the answer, for Plus's chat template."""
        if max_new_tokens < 1:
            raise GsoptError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.source = model if model is not None else default_model(self.device.type)
        self.dtype = resolve_dtype(dtype, self.device)
        self.max_new_tokens = max_new_tokens
        self.config = load_config(self.source)
        self.tokenizer = load_tokenizer(self.source, self.config)
        self.ask = ask or Ask()
        if not family_of(self.config).decoder:  # no decoder: no prompt, no positions
            for flag, given in (
                ("--prompt", prompt is not None),
                ("--task, --language and --keyword", self.ask.asks_anything),
                ("--prefix-text", prefix_text is not None),
            ):
                if given:
                    raise GsoptError(f"{flag}: Granite Speech 5.0 (CTC) takes no prompt; drop it")
            self.template = None
        else:
            if prompt is not None and self.ask.asks_anything:
                raise GsoptError(
                    "--prompt replaces the request; drop --task, --language, --keyword or "
                    "--prompt-mode, or put them in the prompt's text"
                )
            plus = bool(self.config.encoder.cat_hidden_layers)
            instruction = prompt if prompt is not None else self.ask.instruction(plus)
            self.template = prompt_ids(
                self.tokenizer, self.config.audio_token_id, instruction, prefix_text
            )
            self.check_lengths([], [])  # a prompt and budget that leave no room for audio
        self.recipe = load_recipe(recipe)
        self.draft_model = draft_model if self.recipe.drafts_with_model else None
        self.layout = layout
        self.memory_check = memory_check
        self.pipeline = None

    @property
    def fingerprint(self) -> dict[str, Any]:
        """What makes two runs' results comparable: the model (folder or variant) and a
        digest of its config, the dtype, the recipe and a digest of its settings, a digest
        of the prompt, the token budget and gsopt's version. Corpus runs resume only a file
        written with the same."""
        source = self.source
        model = str(Path(source).resolve()) if Path(source).is_dir() else str(source)
        return {
            "model": model,
            "config": _digest(self.config),
            "dtype": dtype_name(self.dtype),
            "recipe": self.recipe.name,
            "recipe_settings": _digest(self.recipe),
            "prompt": _digest(self.template),
            "max_new_tokens": self.max_new_tokens,
            "gsopt": version("gsopt"),
        }

    def check_lengths(self, paths: list, num_samples: list[int], **fix: str) -> None:
        """Refuse, naming the file, a clip whose audio tokens do not fit the positions."""
        if self.template is not None:
            text_tokens = len(self.template) - 1
            check_clip_lengths(
                paths, num_samples, self.config, text_tokens, self.max_new_tokens, **fix
            )

    def load(self, weights: torch.nn.Module | None = None) -> None:
        """Read the weights (and the draft model's) and build the recipe's pipeline; or use
        `weights` already loaded, copied first if the recipe would change them, so the
        caller's model stays as it was (one load serves several recipes)."""
        owned = weights is None
        if owned:
            weights, draft = load_models(
                self.source,
                device=self.device,
                dtype=self.dtype,
                draft=self.draft_model,
                layout=self.layout,
                memory_check=self.memory_check,
            )
        elif self.draft_model is not None:
            draft = load_draft_model(
                self.draft_model,
                self.config,
                device=self.device,
                dtype=self.dtype,
                target_source=self.source,
            )
        else:
            draft = None
        self.pipeline = build_pipeline(
            weights,
            self.recipe,
            draft_model=draft,
            tokenizer=self.tokenizer,
            copy_if_changed=not owned,
        )
        for note in self.pipeline.stages.report.notes:
            log.warning("recipe %s: %s", self.recipe.name, note)

    @property
    def compiles(self) -> bool:
        """Whether the recipe compiles a stage (its first batch then takes longer)."""
        stages = self.pipeline.stages
        return any(compiles(getattr(stages, s)) for s in stages.report.labels)

    def run_batch(
        self,
        index: int,
        paths: list[Path],
        waveforms: list[torch.Tensor],
        max_new_tokens: int | None = None,
    ) -> list[Transcription]:
        """One padded batch; each result equals the clip's alone. Needs `load` first."""
        return _run_batch(
            self.pipeline,
            self.tokenizer,
            self.template,
            index,
            paths,
            waveforms,
            max_new_tokens or self.max_new_tokens,
        )

    def transcribe(
        self,
        audio: str | os.PathLike | list[str | os.PathLike],
        cut: LongForm | None = None,
        *,
        batch_size: int = 32,
        batch_seconds: float = 300.0,
        progress: bool = False,
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """Whisper-shaped results (`gsopt.transcription.longform`) of recordings of any
        length: one dict for one file, a list for a list. Loads the weights if needed."""
        many = isinstance(audio, list | tuple)
        paths = [Path(a) for a in (audio if many else [audio])]
        cut = cut or LongForm()
        check_chunking(cut.chunk_length, cut.chunk_overlap)
        self.check_lengths(
            [f"--chunk-length {cut.chunk_length:g}"],
            [chunk_samples(cut)],
            fix="lower --chunk-length or --max-new-tokens",
        )
        recordings = [read_recording(path, cut.max_audio_seconds) for path in paths]
        if self.pipeline is None:
            self.load()
        results = transcribe_recordings(
            self,
            recordings,
            cut,
            batch_size=batch_size,
            batch_seconds=batch_seconds,
            progress=progress,
            language=self.ask.language or self.ask.target_language,
            prompt_mode=self.ask.prompt_mode,
        )
        return results if many else results[0]


def transcribe(
    files: list[str | os.PathLike] | None = None,
    *,
    model: str | os.PathLike | None = None,
    recipe: str = DEFAULT_RECIPE,
    batch_size: int = 1,
    device: str | None = None,
    dtype: str | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    prompt: str | None = None,
    progress: bool = False,
    draft_model: str | os.PathLike | None = None,
    layout: Layout | None = None,
) -> list[Transcription]:
    """Greedy transcripts of `files` (the bundled sample when empty), in the order given.

    `model` is a checkpoint folder or a variant name (random weights, synthetic tokenizer;
    default `gsopt.runtime.default_model`); `recipe` a built-in recipe name or a .toml path
    (default `static-kv`: eager stages on the static KV cache); `prompt` replaces the
    transcription request (e.g. a translation request). `progress` shows a bar on stderr, in
    seconds of audio, when stderr is a terminal. A recipe's fallbacks on this machine are
    logged as warnings. `draft_model` (a folder or variant sharing the model's tokenizer) is
    the draft of a recipe that drafts with a model; `layout` (from
    `gsopt.model.parallel.join`) shards the decoder across torchrun processes.
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
        layout=layout,
    )
    paths, waveforms = read_files(files, transcriber)
    transcriber.load()
    return transcribe_files(transcriber, paths, waveforms, batch_size, progress)


def read_files(
    files: list[str | os.PathLike] | None, transcriber: Transcriber
) -> tuple[list[Path], list[torch.Tensor]]:
    """The files (the bundled sample when none), each checked from its header before any is
    decoded: a file that is too long is refused without reading it (a 2-hour 48 kHz file
    would take gigabytes)."""
    paths = [Path(f) for f in files] if files else [SAMPLE_AUDIO]
    num_samples = [round(check_audio_file(path) * SAMPLE_RATE) for path in paths]
    transcriber.check_lengths(paths, num_samples)
    return paths, [load_audio(path) for path in paths]


def transcribe_files(
    transcriber: Transcriber,
    paths: list[Path],
    waveforms: list[torch.Tensor],
    batch_size: int = 1,
    progress: bool = False,
) -> list[Transcription]:
    """Batches of `batch_size` in the order given, through a loaded transcriber."""
    if progress and transcriber.compiles:
        print(
            f"gsopt transcribe: compiling {transcriber.recipe.name}'s stages on the first "
            "batch (on a CPU this can take a minute)",
            file=sys.stderr,
        )
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
