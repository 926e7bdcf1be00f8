"""Recordings of any length: windows through the engine in batches, stitched back per file
into a result shaped like Whisper's.

Every window of every recording joins one duration-sorted list, cut into batches as corpus
runs cut clips (so one file's windows batch together and beside other files'), and each
window's text equals the window transcribed alone: its rows are computed as alone, and a
window's own token budget (200 per 30 s, scaled, unless `max_new_tokens` is given) is
applied after its batch's longest. A batch that fails is retried window by window; a window
that fails alone becomes a warning in its file's result, and the rest of the file is kept.

The result: `text`, `segments` (`id`, `start`, `end` in the file's seconds, `text`,
`tokens`), `language`, `duration`, `warnings`, and for Granite Speech 4.1 Plus's modes
`words` (`word`, `start`, `end`: a word starts where the previous one ended, as the model
card's end-time tags imply) or `speakers` (`speaker`, `text`, `start`, `end`), with
`raw_text` keeping the tags.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from gsopt.audio.files import DEFAULT_MAX_AUDIO_SECONDS, Recording
from gsopt.audio.frontend import SAMPLE_RATE
from gsopt.audio.windows import Window, parse_clip_timestamps, windows
from gsopt.errors import GsoptError
from gsopt.model.tokenizer import decode
from gsopt.transcription.batching import plan_batches

TOKENS_PER_30_SECONDS = 200  # the model cards' budget for a 30 s window


@dataclass(frozen=True)
class LongForm:
    """How recordings are cut: `segmentation` fixed or vad, `chunk_length` and
    `chunk_overlap` in seconds, `clip_timestamps` (`start,end,...` seconds), the duration
    cap, and each window's token budget (None: 200 per 30 s, scaled)."""

    segmentation: str = "fixed"
    chunk_length: float = 30.0
    chunk_overlap: float = 0.0
    clip_timestamps: str | None = None
    max_audio_seconds: float = DEFAULT_MAX_AUDIO_SECONDS
    max_new_tokens: int | None = None

    def describe(self) -> str:
        """What decides the windows, for a run's settings record."""
        clips = f", clips {self.clip_timestamps}" if self.clip_timestamps else ""
        return (
            f"{self.segmentation} {self.chunk_length:g} s, overlap {self.chunk_overlap:g} s"
            f"{clips}, cap {self.max_audio_seconds:g} s, budget {self.max_new_tokens or 'auto'}"
        )

    def budget(self, window: Window) -> int:
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        return max(1, math.ceil(TOKENS_PER_30_SECONDS * window.seconds / 30.0))


def chunk_samples(cut: LongForm) -> int:
    """The longest window a cut can make, in samples (what the positions must hold)."""
    return round(cut.chunk_length * SAMPLE_RATE)


@dataclass(frozen=True)
class Piece:
    """One window of one recording, with what its result needs."""

    file: int
    index: int
    window: Window


def transcribe_recordings(
    transcriber,
    recordings: list[Recording],
    cut: LongForm,
    *,
    batch_size: int = 32,
    batch_seconds: float = 300.0,
    progress: bool = False,
    language: str | None = None,
    prompt_mode: str = "default",
) -> list[dict[str, Any]]:
    """Each recording's Whisper-shaped result (see the module), in the order given."""
    planned = []
    for number, recording in enumerate(recordings):
        ranges = parse_clip_timestamps(cut.clip_timestamps, recording.seconds)
        found = windows(recording, cut.segmentation, cut.chunk_length, cut.chunk_overlap, ranges)
        planned += [Piece(number, i, w) for i, w in enumerate(found)]
    done: dict[Piece, tuple[str, list[int]] | str] = {}
    ordered = sorted(planned, key=lambda p: (-p.window.seconds, p.file, p.index))
    items = [(p, p.window.seconds) for p in ordered]
    total = round(sum(p.window.seconds for p in planned), 1)
    with tqdm(
        total=total,
        unit="s",
        desc="transcribing",
        file=sys.stderr,
        disable=None if progress else True,
    ) as bar:
        for number, batch in enumerate(plan_batches(items, batch_size, batch_seconds)):
            pieces = [p for p, _ in batch]
            done.update(_run(transcriber, recordings, cut, number, pieces))
            bar.update(round(sum(p.window.seconds for p in pieces), 1))
    return [
        _result(recording, [p for p in planned if p.file == n], done, cut, language, prompt_mode)
        for n, recording in enumerate(recordings)
    ]


def _run(transcriber, recordings, cut: LongForm, number: int, pieces: list[Piece]):
    """A batch of windows: each one's (text, tokens), or its error as a string."""
    waves = [recordings[p.file].span(p.window.start, p.window.end) for p in pieces]
    paths = [recordings[p.file].path for p in pieces]
    budgets = [cut.budget(p.window) for p in pieces]
    try:
        results = transcriber.run_batch(number, paths, waves, max_new_tokens=max(budgets))
    except (GsoptError, RuntimeError) as error:
        if len(pieces) == 1:
            return {pieces[0]: f"{type(error).__name__}: {str(error).splitlines()[0]}"}
        out = {}
        for piece in pieces:  # one window's fault must not cost the others
            out.update(_run(transcriber, recordings, cut, number, [piece]))
        return out
    out = {}
    for piece, result, budget in zip(pieces, results, budgets, strict=True):
        tokens = result.tokens[:budget]
        text = result.text if len(tokens) == len(result.tokens) else _text(transcriber, tokens)
        out[piece] = (text, tokens)
    return out


def _text(transcriber, tokens: list[int]) -> str:
    return decode(transcriber.tokenizer, tokens)


def _result(recording, pieces, done, cut, language, prompt_mode) -> dict[str, Any]:
    segments, warnings = [], []
    for piece in sorted(pieces, key=lambda p: p.window.start):
        start, end = piece.window.start / SAMPLE_RATE, piece.window.end / SAMPLE_RATE
        outcome = done[piece]
        if isinstance(outcome, str):
            warnings.append(f"window {start:.2f}-{end:.2f} s failed: {outcome}")
            continue
        text, tokens = outcome
        segments.append({"start": start, "end": end, "text": text, "tokens": tokens})
    if cut.chunk_overlap > 0:
        _reconcile(segments)
    result: dict[str, Any] = {
        "text": "",
        "segments": [],
        "language": language,
        "duration": recording.seconds,
        "warnings": warnings,
    }
    if prompt_mode != "default":
        result["raw_text"] = " ".join(s["text"] for s in segments if s["text"])
        result["words" if prompt_mode == "word_timestamps" else "speakers"] = []
    for number, segment in enumerate(segments):
        if prompt_mode == "word_timestamps":
            segment["text"], words = parse_word_timestamps(segment["text"], segment["start"])
            result["words"] += words
        elif prompt_mode == "speaker_attributed":
            segment["text"], turns = parse_speakers(segment["text"])
            result["speakers"] += [
                {**turn, "start": segment["start"], "end": segment["end"]} for turn in turns
            ]
        result["segments"].append({"id": number, **segment})
    result["text"] = " ".join(s["text"] for s in result["segments"] if s["text"])
    return result


_WORD = re.compile(r"[^\w']+")


def _words(text: str) -> list[str]:
    return text.split()


def _key(word: str) -> str:
    return _WORD.sub("", word.lower())


def _reconcile(segments: list[dict[str, Any]], reach: int = 30) -> None:
    """Overlapping windows say the words of their shared audio twice: where the end of one
    window's text and the start of the next share a run of words (case and punctuation
    aside), the next keeps only what follows the run. Without a shared run both stay whole."""
    for before, after in zip(segments, segments[1:], strict=False):
        tail, head = _words(before["text"])[-reach:], _words(after["text"])[:reach]
        best = (0, 0, 0)  # run length, position in head, position in tail
        for i in range(len(tail)):
            for j in range(len(head)):
                n = 0
                while (
                    i + n < len(tail)
                    and j + n < len(head)
                    and _key(tail[i + n]) == _key(head[j + n])
                ):
                    n += 1
                if n > best[0] and i + n == len(tail):  # the run reaches the tail's end
                    best = (n, j, i)
        if best[0]:
            n, j, _ = best
            after["text"] = " ".join(_words(after["text"])[j + n :])


_SPEAKER_TAG = re.compile(r"\[Speaker\s+([^\]]+)\]\s*:?", re.IGNORECASE)
_TIME_TAG = re.compile(r"(?P<word>\S+)\s*\[T:\s*(?P<cs>[+-]?\d+(?:\.\d+)?)\s*\]", re.IGNORECASE)
_TIME_TAG_ALONE = re.compile(r"\s*\[T:\s*[+-]?\d+(?:\.\d+)?\s*\]", re.IGNORECASE)


def _clean(text: str) -> str:
    return " ".join(text.split())


def parse_word_timestamps(text: str, offset: float = 0.0) -> tuple[str, list[dict[str, Any]]]:
    """Plus's `word [T:centiseconds]` tags (each a word's end, relative to its window) as
    words with start and end in the file's seconds, and the text without the tags."""
    words, previous = [], offset
    for match in _TIME_TAG.finditer(text):
        end = max(offset, offset + float(match.group("cs")) / 100.0)
        words.append({"word": match.group("word"), "start": min(previous, end), "end": end})
        previous = max(previous, end)
    return _clean(_TIME_TAG_ALONE.sub(" ", text)), words


def parse_speakers(text: str) -> tuple[str, list[dict[str, Any]]]:
    """Plus's `[Speaker N]:` turns as speakers with their text, and the text without tags."""
    tags = list(_SPEAKER_TAG.finditer(text))
    if not tags:
        return _clean(text), []
    pieces = [_clean(text[: tags[0].start()])]
    turns = []
    for tag, following in zip(tags, [*tags[1:], None], strict=True):
        said = _clean(text[tag.end() : following.start() if following else len(text)])
        if said:
            turns.append({"speaker": f"Speaker {tag.group(1).strip()}", "text": said})
            pieces.append(said)
    return _clean(" ".join(p for p in pieces if p)), turns
