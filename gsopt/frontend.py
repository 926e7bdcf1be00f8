"""The log-mel frontend as a model stage, in plain torch.

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

SAMPLE_RATE = 16000  # every Granite Speech checkpoint was trained at 16 kHz
N_FFT = 512
WIN_LENGTH = 400
HOP_LENGTH = 160
N_MELS = 80
FEATURE_DIM = 2 * N_MELS


def num_feature_frames(num_samples: int) -> int:
    """Encoder input frames for a clip: mel frames (centre framing), halved by stacking."""
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


class LogMelFrontend(nn.Module):
    """Waveforms [B, S] at 16 kHz -> (features [B, T, 160], feature_lengths [B]).

    The constants are non-persistent buffers: checkpoints do not carry them, and they follow
    the model across devices.
    """

    window: torch.Tensor
    mel_filters: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("window", _window(), persistent=False)
        self.register_buffer("mel_filters", _mel_filters(), persistent=False)

    def _apply(
        self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True
    ) -> LogMelFrontend:
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
        batch, num_samples = waveforms.shape
        device = waveforms.device
        if lengths is None:
            lengths = torch.full((batch,), num_samples, dtype=torch.int64, device=device)
        else:
            lengths = lengths.to(device=device, dtype=torch.int64).clamp(0, num_samples)

        # Reflect padding at each clip's own end, by index: position i of the padded row
        # reads sample |i| folded into [0, length - 1] (a triangle wave of period
        # 2 * (length - 1)); this is torch's reflect pad wherever a valid frame looks.
        pad = N_FFT // 2
        positions = torch.arange(-pad, num_samples + pad, device=device).abs()
        period = (2 * (lengths - 1)).clamp(min=1)[:, None]
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
        logmel = torch.matmul(power, self.mel_filters).clamp(min=1e-10).log10()

        num_frames = logmel.shape[1]
        mel_lengths = lengths // HOP_LENGTH + 1
        frame_valid = torch.arange(num_frames, device=device)[None, :] < mel_lengths[:, None]
        peak = logmel.masked_fill(~frame_valid[:, :, None], -torch.inf).amax(
            dim=(1, 2), keepdim=True
        )
        logmel = torch.maximum(logmel, peak - 8.0) / 4.0 + 1.0

        num_out = num_frames // 2  # an odd last frame is dropped
        features = logmel[:, : 2 * num_out].reshape(batch, num_out, FEATURE_DIM)
        feature_lengths = mel_lengths // 2
        row_valid = torch.arange(num_out, device=device)[None, :] < feature_lengths[:, None]
        return features.masked_fill(~row_valid[:, :, None], 0.0), feature_lengths
