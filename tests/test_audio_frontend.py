"""Audio loading and the log-mel frontend, checked against independent references.

The frontend reference here is numpy + librosa's HTK filterbank, written from the published
recipe rather than from gsopt's code, so a shared mistake is unlikely.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile
import torch

from gsopt.audio.files import SAMPLE_AUDIO, load_audio, sample_audio
from gsopt.audio.frontend import LogMelFrontend, num_audio_tokens, num_feature_frames
from gsopt.errors import GsoptError

# Lengths in samples: whole seconds, odd and even mel frame counts, just past a hop, and the
# shortest clip torch's reflect padding accepts (257 samples).
CLIP_LENGTHS = [16000, 16160, 12345, 4801, 16159, 3200, 257, 48000]


def reference_features(audio: np.ndarray) -> np.ndarray:
    """Granite Speech features for one clip, in float64 numpy from the published recipe."""
    librosa = pytest.importorskip("librosa")
    filters = librosa.filters.mel(sr=16000, n_fft=512, n_mels=80, htk=True, norm=None)
    padded = np.pad(audio.astype(np.float64), 256, mode="reflect")
    num_frames = 1 + (len(padded) - 512) // 160
    frames = padded[np.arange(num_frames)[:, None] * 160 + np.arange(512)[None, :]]
    window = np.zeros(512)
    window[56:456] = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 400)  # periodic Hann
    power = np.abs(np.fft.rfft(frames * window, axis=-1)) ** 2
    logmel = np.log10(np.maximum(power @ filters.T.astype(np.float64), 1e-10))
    logmel = np.maximum(logmel, logmel.max() - 8.0) / 4.0 + 1.0
    if num_frames % 2:
        logmel = logmel[:-1]
    return logmel.reshape(-1, 160)


def speechlike(num_samples: int, seed: int) -> np.ndarray:
    """Noise with a decaying harmonic tone: a wide dynamic range across bins and frames."""
    rng = np.random.default_rng(seed)
    t = np.arange(num_samples) / 16000
    tone = sum(np.sin(2 * np.pi * 180 * k * t) / k for k in range(1, 12))
    envelope = np.exp(-3 * t) * (1 + np.sin(2 * np.pi * 3 * t)) / 2
    return (0.3 * envelope * tone + 0.01 * rng.standard_normal(num_samples)).astype(np.float32)


def test_sample_audio_is_bundled_speech():
    audio = sample_audio()
    assert SAMPLE_AUDIO.stat().st_size < 200_000
    assert audio.dtype == torch.float32 and audio.ndim == 1
    assert 5.0 < len(audio) / 16000 < 9.0
    assert 0.01 < audio.abs().max() <= 1.0


@pytest.mark.parametrize("num_samples", CLIP_LENGTHS)
def test_frontend_matches_numpy_librosa_reference(num_samples):
    audio = speechlike(num_samples, seed=num_samples)
    features, lengths = LogMelFrontend()(torch.from_numpy(audio)[None])
    expected = reference_features(audio)
    assert features.shape == (1, *expected.shape)
    assert lengths.tolist() == [expected.shape[0]] == [num_feature_frames(num_samples)]
    np.testing.assert_allclose(features[0].double().numpy(), expected, rtol=0, atol=1e-4)


def test_frontend_matches_reference_on_speech():
    audio = sample_audio()
    features, _ = LogMelFrontend()(audio[None])
    expected = reference_features(audio.numpy())
    np.testing.assert_allclose(features[0].double().numpy(), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("num_samples", [16000, 16159, 12345, 4801])
def test_frontend_matches_transformers_extractor(num_samples):
    pytest.importorskip("torchaudio")
    from transformers import GraniteSpeechFeatureExtractor

    audio = torch.from_numpy(speechlike(num_samples, seed=1))
    expected = GraniteSpeechFeatureExtractor()([audio])["input_features"]
    features, _ = LogMelFrontend()(audio[None])
    torch.testing.assert_close(features, expected, rtol=0, atol=1e-4)


def test_batched_equals_one_at_a_time():
    frontend = LogMelFrontend()
    clips = [torch.from_numpy(speechlike(n, seed=i)) for i, n in enumerate(CLIP_LENGTHS)]
    # Pad with loud noise, not zeros: nothing past a clip's length may leak into its features.
    batch = torch.randn(len(clips), max(map(len, clips)))
    for row, clip in zip(batch, clips, strict=True):
        row[: len(clip)] = clip
    lengths = torch.tensor([len(c) for c in clips])
    features, feature_lengths = frontend(batch, lengths)
    assert features.shape[1] == num_feature_frames(batch.shape[1])
    for i, clip in enumerate(clips):
        alone, alone_length = frontend(clip[None])
        n = int(feature_lengths[i])
        assert n == int(alone_length[0]) == alone.shape[1]
        torch.testing.assert_close(features[i, :n], alone[0], rtol=0, atol=1e-5)
        assert torch.all(features[i, n:] == 0)


def test_lengths_none_means_full_rows():
    audio = torch.from_numpy(np.stack([speechlike(8000, 1), speechlike(8000, 2)]))
    frontend = LogMelFrontend()
    with_lengths = frontend(audio, torch.tensor([8000, 8000]))
    without = frontend(audio)
    torch.testing.assert_close(with_lengths, without, rtol=0, atol=0)


def test_dtype_cast_keeps_float32_constants():
    audio = torch.from_numpy(speechlike(8000, 3))[None]
    frontend = LogMelFrontend()
    expected, _ = frontend(audio)
    frontend.to(torch.bfloat16)
    assert frontend.window.dtype == frontend.mel_filters.dtype == torch.float32
    torch.testing.assert_close(frontend(audio)[0], expected, rtol=0, atol=0)
    assert frontend(audio.bfloat16())[0].dtype == torch.float32
    assert frontend.state_dict() == {}


def test_meta_construction_then_to_empty():
    with torch.device("meta"):
        frontend = LogMelFrontend()
    frontend.to_empty(device="cpu")
    torch.testing.assert_close(frontend.window, LogMelFrontend().window, rtol=0, atol=0)
    torch.testing.assert_close(frontend.mel_filters, LogMelFrontend().mel_filters, rtol=0, atol=0)


def test_frontend_traces_as_one_graph():
    """fullgraph with dynamo only (no inductor): fast, and fails on any graph break."""
    frontend = LogMelFrontend()
    compiled = torch.compile(frontend, fullgraph=True, backend="eager", dynamic=True)
    for n in (8000, 12345):
        audio = torch.from_numpy(np.stack([speechlike(n, 1), speechlike(n, 2)]))
        lengths = torch.tensor([n, n - 999])
        torch.testing.assert_close(compiled(audio, lengths), frontend(audio, lengths))


@pytest.mark.slow
def test_frontend_compiles_with_inductor():
    frontend = LogMelFrontend()
    compiled = torch.compile(frontend, fullgraph=True)
    audio = torch.from_numpy(np.stack([speechlike(12345, 1), speechlike(12345, 2)]))
    lengths = torch.tensor([12345, 7000])
    expected = frontend(audio, lengths)
    actual = compiled(audio, lengths)
    torch.testing.assert_close(actual[0], expected[0], rtol=0, atol=1e-4)
    torch.testing.assert_close(actual[1], expected[1])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_frontend_on_cuda_matches_cpu():
    audio = torch.from_numpy(np.stack([speechlike(16000, 1), speechlike(16000, 2)]))
    lengths = torch.tensor([16000, 9999])
    frontend = LogMelFrontend()
    expected = frontend(audio, lengths)
    actual = frontend.cuda()(audio.cuda(), lengths.cuda())
    torch.testing.assert_close(actual[0].cpu(), expected[0], rtol=0, atol=1e-4)
    torch.testing.assert_close(actual[1].cpu(), expected[1])


def test_num_audio_tokens_matches_transformers():
    from transformers.models.granite_speech.feature_extraction_granite_speech import (
        GraniteSpeechFeatureExtractor,
    )

    # The extractor's constructor needs torchaudio; its token count needs only these fields,
    # taken from the constructor's own defaults.
    defaults = inspect.signature(GraniteSpeechFeatureExtractor.__init__).parameters
    fake = SimpleNamespace(
        melspec_kwargs={"hop_length": defaults["hop_length"].default},
        projector_window_size=defaults["projector_window_size"].default,
        projector_downsample_rate=defaults["projector_downsample_rate"].default,
    )
    lengths = list(range(0, 20000, 7)) + [160 * 30 * k + d for k in range(1, 60) for d in (-1, 0)]
    expected = GraniteSpeechFeatureExtractor._get_num_audio_features(fake, lengths)
    assert [num_audio_tokens(n) for n in lengths] == expected


def test_num_audio_tokens_published_values():
    assert num_audio_tokens(16000) == 12  # 1 s: 101 mel -> 50 frames -> 4 windows
    assert num_audio_tokens(480000) == 300  # 30 s: about 10 tokens a second
    for n in range(0, 100000, 997):
        assert num_audio_tokens(n) == math.ceil(((n // 160 + 1) // 2) / 15) * 3
    assert num_audio_tokens(16000, window=10, downsample=5) == 10


# --- audio loading ---


def sine(rate: int, seconds: float, freq: float = 440.0, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(round(rate * seconds)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_frequency(audio: torch.Tensor) -> float:
    spectrum = np.abs(np.fft.rfft(audio.numpy() * np.hanning(len(audio))))
    return float(np.argmax(spectrum)) * 16000 / len(audio)


@pytest.mark.parametrize("rate", [8000, 16000, 44100, 48000])
@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize(
    "fmt,subtype",
    [
        ("WAV", "PCM_U8"),
        ("WAV", "PCM_16"),
        ("WAV", "PCM_24"),
        ("WAV", "PCM_32"),
        ("WAV", "FLOAT"),
        ("FLAC", "PCM_16"),
        ("FLAC", "PCM_24"),
        ("OGG", "VORBIS"),
    ],
)
def test_load_audio_resamples_and_keeps_content(tmp_path, rate, channels, fmt, subtype):
    seconds = 1.5
    mono = sine(rate, seconds)
    data = np.stack([mono] * channels, axis=1)
    path = tmp_path / f"clip.{fmt.lower()}"
    soundfile.write(path, data, rate, format=fmt, subtype=subtype)
    audio = load_audio(path)
    assert audio.dtype == torch.float32 and audio.ndim == 1
    assert abs(len(audio) - seconds * 16000) <= 1
    assert abs(peak_frequency(audio) - 440.0) < 1.0
    # Level kept (RMS of a 0.5 sine), away from the resampler's edges.
    rms = float(audio[1600:-1600].square().mean().sqrt())
    assert rms == pytest.approx(0.5 / math.sqrt(2), rel=0.02)


def test_stereo_downmix_is_channel_mean(tmp_path):
    left, right = sine(16000, 1.0, 440.0, 0.5), sine(16000, 1.0, 1000.0, 0.3)
    path = tmp_path / "stereo.wav"
    soundfile.write(path, np.stack([left, right], axis=1), 16000, subtype="FLOAT")
    torch.testing.assert_close(load_audio(path), torch.from_numpy((left + right) / 2))


def test_stereo_downmix_before_resampling(tmp_path):
    import soxr

    left, right = sine(48000, 1.0, 440.0, 0.5), sine(48000, 1.0, 1000.0, 0.3)
    path = tmp_path / "stereo48k.wav"
    soundfile.write(path, np.stack([left, right], axis=1), 48000, subtype="FLOAT")
    expected = soxr.resample((left + right) / 2, 48000, 16000, quality="HQ")
    torch.testing.assert_close(load_audio(path), torch.from_numpy(expected))


def assert_gsopt_error_names(path: Path, problem: str) -> None:
    with pytest.raises(GsoptError) as info:
        load_audio(path)
    message = str(info.value)
    assert str(path) in message and problem in message and "\n" not in message


def test_missing_file_error(tmp_path):
    assert_gsopt_error_names(tmp_path / "nope.wav", "no such audio file")


def test_text_file_renamed_wav_error(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("this is not audio\n")
    assert_gsopt_error_names(path, "not a readable audio file")


def test_truncated_file_error(tmp_path):
    path = tmp_path / "cut.flac"
    soundfile.write(path, sine(16000, 1.0), 16000)
    path.write_bytes(path.read_bytes()[:30])
    assert_gsopt_error_names(path, "not a readable audio file")


def test_zero_length_wav_error(tmp_path):
    path = tmp_path / "empty.wav"
    soundfile.write(path, np.zeros(0, dtype=np.float32), 16000)
    assert_gsopt_error_names(path, "empty")
