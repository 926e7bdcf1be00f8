"""The log-mel frontends as a model stage, in plain torch: `LogMelFrontend` for Granite
Speech 3.x/4.x, `LogMelDeltaFrontend` (log-mels and deltas) for 5.0.

Same numbers as transformers' GraniteSpeechFeatureExtractor (torchaudio's MelSpectrogram:
n_fft 512, periodic Hann of 400 centred in 512, hop 160, reflect-padded centre frames,
power 2, 80 HTK mel bins over 0-8 kHz without normalisation), then
max(log10(mel), peak - 8) / 4 + 1 and pairs of frames stacked into 160 features.

One deliberate difference, for padded batches: transformers pads clips with zeros and takes
the peak over the whole padded row, so a clip's features depend on its batch. Here each
clip is reflect-padded at its own end and its peak is taken over its own frames only, so a
clip's valid features are the same batched or alone (and equal transformers' for a clip
alone). Rows past a clip's feature length are zero.

The stage runs on the model's device and compiles with fullgraph: no host syncs, shapes come
from tensor sizes only. Inductor runs the complex FFT as an eager kernel (it warns so); the
stage is a tiny share of the model's time.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from gsopt.errors import GsoptError

SAMPLE_RATE = 16000  # every Granite Speech checkpoint was trained at 16 kHz
N_FFT = 512
WIN_LENGTH = 400
HOP_LENGTH = 160
N_MELS = 80
FEATURE_DIM = 2 * N_MELS


def num_feature_frames(num_samples: int) -> int:
    """Encoder input frames for a clip: mel frames (centre framing), halved by stacking.

    Both frontends give this many: 3.x/4.x drop an odd last mel frame, and 5.0's
    ceil((S // 160) / 2) is the same number.
    """
    return (num_samples // HOP_LENGTH + 1) // 2


def num_audio_tokens(num_samples: int, window: int = 15, downsample: int = 5) -> int:
    """Audio tokens the projector emits for a clip: window // downsample per started window.

    The published formula (transformers' `_get_num_audio_features`); the prompt needs this
    many audio placeholder tokens.
    """
    return math.ceil(num_feature_frames(num_samples) / window) * (window // downsample)


def _window(device: torch.device | None = None) -> torch.Tensor:
    """Periodic Hann of WIN_LENGTH, zero-padded to N_FFT on both sides as torch.stft does."""
    hann = torch.hann_window(WIN_LENGTH, periodic=True, dtype=torch.float64, device=device)
    left = (N_FFT - WIN_LENGTH) // 2
    return nn.functional.pad(hann, (left, N_FFT - WIN_LENGTH - left)).float()


def _mel_filters(device: torch.device | None = None) -> torch.Tensor:
    """HTK-scale triangular filters, unnormalised, [N_FFT // 2 + 1, N_MELS].

    Built here (float64, then float32) so that neither librosa nor torchaudio is needed at
    run time; the formula is torchaudio's melscale_fbanks(mel_scale="htk", norm=None).
    """
    f64 = dict(dtype=torch.float64, device=device)
    fft_freqs = torch.linspace(0, SAMPLE_RATE / 2, N_FFT // 2 + 1, **f64)
    mel_max = 2595.0 * math.log10(1.0 + (SAMPLE_RATE / 2) / 700.0)
    mel_points = torch.linspace(0.0, mel_max, N_MELS + 2, **f64)
    hz_points = 700.0 * (10.0 ** (mel_points / 2595.0) - 1.0)
    widths = hz_points.diff()
    slopes = hz_points[None, :] - fft_freqs[:, None]
    rising = -slopes[:, :-2] / widths[:-1]
    falling = slopes[:, 2:] / widths[1:]
    return torch.clamp(torch.minimum(rising, falling), min=0.0).float()


class _MelSpectrogram(nn.Module):
    """The log10 mel power spectrogram both Granite Speech frontends start from.

    The constants are non-persistent buffers: checkpoints do not carry them, and they follow
    the model across devices.
    """

    window: torch.Tensor
    mel_filters: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("window", _window(), persistent=False)
        self.register_buffer("mel_filters", _mel_filters(), persistent=False)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True):
        """Rebuild the constants after every move or cast.

        A model-wide `.to(torch.bfloat16)` must not round them (the frontend always computes
        in float32), and `to_empty()` after meta-device construction must not leave them
        uninitialised.
        """
        super()._apply(fn, recurse)
        device = self.window.device
        self.window = _window(device)
        self.mel_filters = _mel_filters(device)
        return self

    def log_mel(self, waveforms: torch.Tensor, extents: torch.Tensor) -> torch.Tensor:
        """log10(max(mel power, 1e-10)) [B, W // 160 + 1, 80] of waveforms [B, W] (float32).

        Centre framing with reflect padding at each clip's own end: row b is read as its
        first `extents[b]` samples. Position i of the padded row reads sample |i| folded into
        [0, extent - 1] (a triangle wave of period 2 * (extent - 1)); this is torch's reflect
        pad wherever a valid frame looks, and it also serves clips under 257 samples, where
        torch's reflect pad refuses.
        """
        num_samples = waveforms.shape[1]
        pad = N_FFT // 2
        positions = torch.arange(-pad, num_samples + pad, device=waveforms.device).abs()
        period = (2 * (extents - 1)).clamp(min=1)[:, None]
        folded = positions[None, :] % period
        index = torch.minimum(folded, period - folded)
        padded = waveforms.float().gather(1, index)

        spec = torch.stft(
            padded,
            n_fft=N_FFT,
            hop_length=HOP_LENGTH,
            window=self.window,
            center=False,
            return_complex=True,
        )
        power = spec.abs().pow(2).transpose(1, 2)  # [B, frames, 257]
        return torch.matmul(power, self.mel_filters).clamp(min=1e-10).log10()


def _clip_lengths(waveforms: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    batch, num_samples = waveforms.shape
    if lengths is None:
        return torch.full((batch,), num_samples, dtype=torch.int64, device=waveforms.device)
    return lengths.to(device=waveforms.device, dtype=torch.int64).clamp(0, num_samples)


def _floor_and_scale(logmel: torch.Tensor, frame_valid: torch.Tensor) -> torch.Tensor:
    """max(logmel, peak - 8) / 4 + 1 with each clip's peak over its own valid frames."""
    peak = logmel.masked_fill(~frame_valid[:, :, None], -torch.inf).amax(dim=(1, 2), keepdim=True)
    return torch.maximum(logmel, peak - 8.0) / 4.0 + 1.0


class LogMelFrontend(_MelSpectrogram):
    """Granite Speech 3.x/4.x: waveforms [B, S] at 16 kHz -> (features [B, T, 160],
    feature_lengths [B])."""

    def forward(
        self, waveforms: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-mel features in float32, stacked in pairs of frames.

        waveforms: [B, S], clips left-aligned and padded with anything past their length.
        lengths: [B] int64 valid samples per clip (None: every clip fills its row).
        Returns features [B, T, 160] with T = (S // 160 + 1) // 2, rows past each clip's
        length zeroed, and feature_lengths [B] = (lengths // 160 + 1) // 2.
        Clips under 257 samples (where torch's reflect pad refuses) reflect repeatedly.
        """
        batch = waveforms.shape[0]
        device = waveforms.device
        lengths = _clip_lengths(waveforms, lengths)
        logmel = self.log_mel(waveforms, lengths)

        num_frames = logmel.shape[1]
        mel_lengths = lengths // HOP_LENGTH + 1
        frame_valid = torch.arange(num_frames, device=device)[None, :] < mel_lengths[:, None]
        logmel = _floor_and_scale(logmel, frame_valid)

        num_out = num_frames // 2  # an odd last frame is dropped
        features = logmel[:, : 2 * num_out].reshape(batch, num_out, FEATURE_DIM)
        feature_lengths = mel_lengths // 2
        row_valid = torch.arange(num_out, device=device)[None, :] < feature_lengths[:, None]
        return features.masked_fill(~row_valid[:, :, None], 0.0), feature_lengths


class LogMelDeltaFrontend(_MelSpectrogram):
    """Granite Speech 5.0: waveforms [B, S] at 16 kHz -> (features [B, T, 320],
    feature_lengths [B]).

    The same numbers as transformers' GraniteSpeech5FeatureExtractor: the 3.x/4.x log-mel
    (same mel, frames, floor and scale), then deltas over 3 frames ((x[t+1] - x[t-1]) / 2,
    the edges replicated, as torchaudio's compute_deltas) beside each frame, and pairs of
    frames stacked: [mel_t, delta_t, mel_t+1, delta_t+1]. One framing detail differs from
    3.x/4.x: the extractor zero-pads the waveform to (frames - 1) * 160 + 1 samples, which
    adds one zero sample (moving the reflection) to a clip of an odd multiple of 160.

    As in LogMelFrontend, each clip is framed, floored and differentiated on its own
    samples and frames only, so its features are the same batched or alone (and equal
    transformers' for a clip alone). Rows past a clip's feature length are zero.
    """

    def forward(
        self, waveforms: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """waveforms: [B, S], clips left-aligned and padded with anything past their length.
        lengths: [B] int64 valid samples per clip (None: every clip fills its row).
        Returns features [B, num_feature_frames(S), 320], rows past each clip's length
        zeroed, and feature_lengths [B] = num_feature_frames(lengths)."""
        batch, num_samples = waveforms.shape
        device = waveforms.device
        lengths = _clip_lengths(waveforms, lengths)
        # Mel frames kept (even), and each clip's extent: zero-padded, as the extractor pads
        # the waveform, to (frames - 1) * hop + 1 samples when it is shorter.
        num_frames = (lengths // HOP_LENGTH + 1) // 2 * 2
        extents = torch.maximum(lengths, (num_frames - 1) * HOP_LENGTH + 1)
        row_frames = 2 * num_feature_frames(num_samples)
        if row_frames == 0:
            raise GsoptError(
                f"waveforms have {num_samples} samples, expected at least {HOP_LENGTH} "
                "(one mel frame)"
            )
        width = max(num_samples, (row_frames - 1) * HOP_LENGTH + 1)
        samples = torch.arange(width, device=device)
        waves = nn.functional.pad(waveforms.float(), (0, width - num_samples))
        waves = waves.masked_fill(samples[None, :] >= lengths[:, None], 0.0)
        logmel = self.log_mel(waves, extents)[:, :row_frames]

        frames = torch.arange(row_frames, device=device)[None, :]
        logmel = _floor_and_scale(logmel, frames < num_frames[:, None])
        last = (num_frames - 1).clamp(min=0)[:, None]
        after = torch.minimum(frames + 1, last).expand(batch, -1)
        before = (frames - 1).clamp(min=0).expand(batch, -1)
        deltas = (_gather_frames(logmel, after) - _gather_frames(logmel, before)) / 2

        features = torch.cat([logmel, deltas], dim=-1).reshape(batch, row_frames // 2, -1)
        feature_lengths = num_frames // 2
        row_valid = frames[:, : row_frames // 2] < feature_lengths[:, None]
        return features.masked_fill(~row_valid[:, :, None], 0.0), feature_lengths


def _gather_frames(logmel: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """logmel [B, T, M] at frames index [B, T]."""
    return logmel.gather(1, index[:, :, None].expand(-1, -1, logmel.shape[-1]))
