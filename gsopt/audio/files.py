"""Audio files in, the model's input out: float32 mono at 16 kHz.

soundfile reads WAV/FLAC/OGG (and MP3 where its libsndfile has it) at any rate and sample
format; soxr at 'HQ' resamples, as librosa does by default. Channels are averaged before
resampling, so the resampler runs once and stereo costs no more than mono.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile
import soxr
import torch

from gsopt.audio.frontend import SAMPLE_RATE
from gsopt.errors import GsoptError

SAMPLE_AUDIO = Path(__file__).parents[1] / "assets" / "sample.flac"
"""Bundled English speech (espeak-ng, 6.7 s) for demos when no file is given."""


# The shortest clip with one encoder frame (two mel frames: samples // 160 + 1 >= 2).
MIN_SAMPLES = 160
# Below this a header cannot be telling the truth about speech (8 kHz is telephony's rate):
# a 1 Hz header would turn 10 samples into 10 seconds.
MIN_SAMPLE_RATE = 1000


def check_audio_file(path: str | os.PathLike) -> float:
    """A file's duration in seconds from its header alone (nothing decoded), or a one-line
    error naming the file: missing, a folder, or not audio libsndfile can read."""
    path = Path(path)
    if path.is_dir():
        raise GsoptError(f"{path}: is a folder, not an audio file; name the files in it")
    if not path.is_file():
        raise GsoptError(f"{path}: no such audio file")
    try:
        info = soundfile.info(path)
    except RuntimeError as exc:  # soundfile's errors derive from RuntimeError
        reason = " ".join(getattr(exc, "error_string", str(exc)).split())
        raise GsoptError(f"{path}: not a readable audio file ({reason})") from None
    if info.samplerate < MIN_SAMPLE_RATE:
        raise GsoptError(
            f"{path}: its header says {info.samplerate} Hz, below any speech recording's rate "
            f"({MIN_SAMPLE_RATE} Hz at least); the header is wrong or this is not audio"
        )
    return info.duration


def load_audio(path: str | os.PathLike) -> torch.Tensor:
    """Read an audio file as a 1-D float32 tensor of mono samples at 16 kHz.

    Raises GsoptError, one line naming the file, when the file is missing or a folder, is not
    audio that libsndfile can decode, holds NaN or infinite samples, or is shorter than one
    encoder frame (10 ms): the same refusal whether the clip would run alone or in a batch.
    """
    path = Path(path)
    check_audio_file(path)
    try:
        data, rate = soundfile.read(path, dtype="float32", always_2d=True)
    except RuntimeError as exc:
        reason = " ".join(getattr(exc, "error_string", str(exc)).split())
        raise GsoptError(f"{path}: not a readable audio file ({reason})") from None
    if not np.isfinite(data).all():
        raise GsoptError(f"{path}: holds NaN or infinite samples; repair or drop the file")
    mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    if rate != SAMPLE_RATE and mono.size > 0:
        mono = soxr.resample(mono, rate, SAMPLE_RATE, quality="HQ")
    if mono.size == 0:  # also a sample or two at a high rate, resampled to nothing
        raise GsoptError(f"{path}: the audio clip is empty (0 samples)")
    if mono.size < MIN_SAMPLES:
        raise GsoptError(
            f"{path}: {mono.size} samples at 16 kHz is shorter than one encoder frame "
            f"({MIN_SAMPLES} samples, 10 ms): nothing to transcribe"
        )
    return torch.from_numpy(np.ascontiguousarray(mono, dtype=np.float32))


# Up to this length a file is decoded whole as load_audio decodes it (float32 at 16 kHz,
# 115 MB for 30 minutes), so a recording gives the samples `transcribe` always gave; a longer
# one is read block by block and kept as 16-bit samples (a 4-hour file: 460 MB).
WHOLE_SECONDS = 1800.0
BLOCK_SECONDS = 60
DEFAULT_MAX_AUDIO_SECONDS = 4 * 3600.0


@dataclass(frozen=True)
class Recording:
    """A file's audio at 16 kHz, mono: float32 samples, or int16 for a long file (never
    float64 and never at the file's own rate: a multi-hour recording stays small)."""

    path: Path
    samples: np.ndarray

    @property
    def num_samples(self) -> int:
        return len(self.samples)

    @property
    def seconds(self) -> float:
        return len(self.samples) / SAMPLE_RATE

    def span(self, start: int, end: int) -> torch.Tensor:
        """Samples [start, end) as float32 in [-1, 1]."""
        piece = self.samples[start:end]
        if piece.dtype == np.int16:
            piece = piece.astype(np.float32) / 32768.0
        return torch.from_numpy(np.ascontiguousarray(piece, dtype=np.float32))


def check_duration(path: Path, seconds: float, max_seconds: float) -> None:
    if max_seconds and seconds > max_seconds:
        raise GsoptError(
            f"{path}: {seconds:.0f} s of audio is longer than --max-audio-seconds "
            f"{max_seconds:g}; raise it (0: no cap) or cut the file"
        )


def read_recording(
    path: str | os.PathLike, max_seconds: float = DEFAULT_MAX_AUDIO_SECONDS
) -> Recording:
    """A recording of any length up to `max_seconds` (0: no cap), refused from its header
    before anything is decoded when the header says it is longer, and refused while it is
    read when the header lied. A long file is read and resampled block by block (soxr's
    streaming resampler) into 16-bit samples."""
    path = Path(path)
    seconds = check_audio_file(path)
    check_duration(path, seconds, max_seconds)
    if seconds <= WHOLE_SECONDS:
        samples = load_audio(path).numpy()
        check_duration(path, len(samples) / SAMPLE_RATE, max_seconds)
        return Recording(path, samples)
    return Recording(path, _read_blocks(path, max_seconds))


def _read_blocks(path: Path, max_seconds: float) -> np.ndarray:
    with soundfile.SoundFile(path) as f:
        rate = f.samplerate
        resampler = soxr.ResampleStream(rate, SAMPLE_RATE, 1, quality="HQ")
        out = np.empty(round(f.frames * SAMPLE_RATE / rate) + SAMPLE_RATE, dtype=np.int16)
        filled = 0

        def put(chunk: np.ndarray) -> None:
            nonlocal out, filled
            if filled + len(chunk) > len(out):  # the header said fewer frames than it holds
                out = np.resize(out, max(2 * len(out), filled + len(chunk)))
            out[filled : filled + len(chunk)] = np.clip(np.rint(chunk * 32767.0), -32768, 32767)
            filled += len(chunk)
            check_duration(path, filled / SAMPLE_RATE, max_seconds)

        try:
            for block in f.blocks(BLOCK_SECONDS * rate, dtype="float32", always_2d=True):
                if not np.isfinite(block).all():
                    raise GsoptError(
                        f"{path}: holds NaN or infinite samples; repair or drop the file"
                    )
                put(resampler.resample_chunk(block.mean(axis=1, dtype=np.float32)))
        except RuntimeError as exc:
            reason = " ".join(getattr(exc, "error_string", str(exc)).split())
            raise GsoptError(f"{path}: not a readable audio file ({reason})") from None
        put(resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True))
    return out[:filled]


def sample_audio() -> torch.Tensor:
    """The bundled sample clip, loaded as `load_audio` loads any file."""
    return load_audio(SAMPLE_AUDIO)
