"""Long recordings cut into windows the model can take, each with its place in the file.

- `fixed`: windows of at most `chunk_seconds`, each cut at the quietest 100 ms inside the
  last second before its limit (as vLLM cuts), so a cut falls between words rather than
  inside one; with `overlap_seconds` each window starts that much before the last cut (the
  texts are reconciled at the seams by matching words).
- `vad`: Silero VAD's speech spans (the `silero-vad` package, a learned detector): silence
  is skipped, speech padded, gaps shorter than half a second merged, spans longer than
  `chunk_seconds` split at their longest inner silence. Its probabilities are computed
  block by block, so a multi-hour file never sits in memory as float32.
`ranges` (from `--clip-timestamps`) restrict either to parts of the file. Times are samples
at 16 kHz in the original file.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from gsopt.audio.files import Recording
from gsopt.audio.frontend import SAMPLE_RATE
from gsopt.errors import GsoptError

SEGMENTATIONS = ("fixed", "vad")
FRAME = SAMPLE_RATE // 100  # 10 ms energy frames
QUIET_FRAMES = 10  # the quietest 100 ms ...
SEARCH_FRAMES = 100  # ... in the last second before a window's limit
VAD_CHUNK = 512  # Silero's frame at 16 kHz
VAD_BLOCK = 60 * SAMPLE_RATE
VAD_PAD_MS = 200
VAD_MIN_GAP_MS = 500


@dataclass(frozen=True)
class Window:
    start: int
    end: int

    @property
    def seconds(self) -> float:
        return (self.end - self.start) / SAMPLE_RATE


def parse_clip_timestamps(text: str | None, seconds: float) -> list[tuple[float, float]]:
    """`start,end,start,end,...` in seconds (Whisper's form; a last start alone runs to
    the end of the file) as ranges within the file; None: the whole file."""
    if not text:
        return [(0.0, seconds)]
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise GsoptError(f"--clip-timestamps {text!r}: expected start,end,... in seconds") from None
    if len(values) % 2:
        values.append(seconds)
    ranges = [
        (max(0.0, a), min(seconds, b)) for a, b in zip(values[::2], values[1::2], strict=True)
    ]
    previous = 0.0
    for start, end in ranges:
        if not start < end or start < previous:
            raise GsoptError(
                f"--clip-timestamps {text!r}: each range must end after it starts, in order, "
                f"within the file ({seconds:.1f} s)"
            )
        previous = end
    return ranges


def check_chunking(chunk_seconds: float, overlap_seconds: float) -> None:
    if not chunk_seconds > 0:
        raise GsoptError(f"--chunk-length must be above 0 seconds, got {chunk_seconds:g}")
    if not 0 <= overlap_seconds < chunk_seconds:
        raise GsoptError(
            f"--chunk-overlap {overlap_seconds:g} must be at least 0 and below --chunk-length "
            f"{chunk_seconds:g}"
        )


def windows(
    recording: Recording,
    segmentation: str = "fixed",
    chunk_seconds: float = 30.0,
    overlap_seconds: float = 0.0,
    ranges: list[tuple[float, float]] | None = None,
) -> list[Window]:
    """The recording's windows in time order (see the module's docstring)."""
    check_chunking(chunk_seconds, overlap_seconds)
    if segmentation not in SEGMENTATIONS:
        raise GsoptError(
            f"--segmentation {segmentation!r}: choose one of {', '.join(SEGMENTATIONS)}"
        )
    ranges = ranges or [(0.0, recording.seconds)]
    spans = [(round(a * SAMPLE_RATE), round(b * SAMPLE_RATE)) for a, b in ranges]
    if segmentation == "vad":
        return _vad_windows(recording, chunk_seconds, spans)
    limit, overlap = round(chunk_seconds * SAMPLE_RATE), round(overlap_seconds * SAMPLE_RATE)
    return [w for a, b in spans for w in _fixed_windows(recording, a, b, limit, overlap)]


def _frame_energy(recording: Recording, start: int, end: int) -> np.ndarray:
    """Mean square of each 10 ms frame of [start, end)."""
    x = recording.span(start, end).numpy()
    frames = len(x) // FRAME
    return np.square(x[: frames * FRAME].reshape(frames, FRAME), dtype=np.float64).mean(1)


def _fixed_windows(recording: Recording, start: int, end: int, limit: int, overlap: int):
    out = []
    while end - start > limit:
        search_from = start + limit - SEARCH_FRAMES * FRAME
        energy = _frame_energy(recording, search_from, start + limit)
        runs = np.convolve(energy, np.ones(QUIET_FRAMES), mode="valid")
        quietest = int(np.argmin(runs))
        cut = search_from + (quietest + QUIET_FRAMES // 2) * FRAME
        out.append(Window(start, cut))
        start = max(cut - overlap, start + FRAME)
    out.append(Window(start, end))
    return out


@functools.cache
def _silero():
    try:
        from silero_vad import load_silero_vad
    except ModuleNotFoundError:
        raise GsoptError("--segmentation vad needs silero-vad: pip install silero-vad") from None
    return load_silero_vad()


def speech_probabilities(recording: Recording) -> list[float]:
    """Silero's speech probability of every 32 ms frame, block by block (the model keeps
    its state across calls, so the blocks read as one stream)."""
    model = _silero()
    model.reset_states()
    probabilities = []
    with torch.no_grad():
        for block_start in range(0, recording.num_samples, VAD_BLOCK):
            block = recording.span(block_start, block_start + VAD_BLOCK)
            pad = -len(block) % VAD_CHUNK
            block = torch.nn.functional.pad(block, (0, pad))
            for chunk in block.split(VAD_CHUNK):
                probabilities.append(model(chunk, SAMPLE_RATE).item())
    return probabilities


def _vad_windows(recording: Recording, chunk_seconds: float, spans) -> list[Window]:
    from silero_vad.utils_vad import get_speech_timestamps_from_probs

    speech = get_speech_timestamps_from_probs(
        speech_probabilities(recording),
        sampling_rate=SAMPLE_RATE,
        max_speech_duration_s=chunk_seconds,
        min_silence_duration_ms=VAD_MIN_GAP_MS,
        speech_pad_ms=VAD_PAD_MS,
        audio_length_samples=recording.num_samples,
    )
    out = []
    for part in speech:
        for a, b in spans:
            start, end = max(part["start"], a), min(part["end"], b)
            if end - start >= FRAME:
                out.append(Window(start, end))
    return out
