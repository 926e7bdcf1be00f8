"""Audio files in, the model's input out: float32 mono at 16 kHz.

soundfile reads WAV/FLAC/OGG (and MP3 where its libsndfile has it) at any rate and sample
format; soxr at 'HQ' resamples, as librosa does by default. Channels are averaged before
resampling, so the resampler runs once and stereo costs no more than mono.
"""

from __future__ import annotations

import os
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


def sample_audio() -> torch.Tensor:
    """The bundled sample clip, loaded as `load_audio` loads any file."""
    return load_audio(SAMPLE_AUDIO)
