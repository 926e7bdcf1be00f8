"""The current model family against transformers 5.24 (CPU, fp32): granite-speech-4.1-2b
(with its BPE CTC head out_llm.safetensors), 4.1-2b-plus (exported encoder layers) and
5.0-470m-turboctc (encoder-only CTC), and the 5.0 frontend against numpy + librosa."""

from __future__ import annotations

import json

import fms.models
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from family_helpers import (
    PLUS_CAT_LAYERS,
    PLUS_ENCODER,
    PLUS_WIDTH,
    greedy_tokens,
    plus_hf_config,
    reference_ctc_model,
    reference_plus_model,
    reference_transcripts,
    save_out_llm,
)
from helpers import AUDIO_TOKEN_ID, TINY_TEXT, hf_config, reference_model, save_checkpoint
from safetensors.torch import load_file, save_file
from test_audio_frontend import speechlike

import gsopt
from gsopt.audio.frontend import LogMelDeltaFrontend, num_feature_frames
from gsopt.model.config import CTC_VARIANTS, from_hf_config, to_hf_config
from gsopt.model.encoder import encoder_frame_mask
from gsopt.model.granite_speech5 import FP32BatchNorm1d, GraniteSpeechCTC, ctc_greedy_decode

LOGITS_SCALING = TINY_TEXT["logits_scaling"]  # transformers returns logits * this
EOS = TINY_TEXT["eos_token_id"]
VOCAB = TINY_TEXT["vocab_size"]
HIDDEN = 32  # the tiny encoder's hidden_dim
FRAMES = [5, 8, 37]  # context 8: under one block, one block, blocks with a remainder
TINY_CTC = CTC_VARIANTS["tiny-ctc"]  # context 8, subsampling blocks 0 and 2 of 4


def audio_prompt(num_frames: int) -> torch.Tensor:
    return torch.tensor([5, 6, *[AUDIO_TOKEN_ID] * (-(-num_frames // 15) * 3), 7, 8, 9])


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# --- granite-speech-4.1-2b-plus: exported encoder layers ------------------------------------


@pytest.fixture(scope="module")
def plus(tmp_path_factory):
    ref = reference_plus_model()
    folder = tmp_path_factory.mktemp("plus")
    ref.save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["model_type"] == "granite_speech_plus"
    return ref, folder, gsopt.load_model(folder, lora="none")


@pytest.mark.parametrize("frames", FRAMES)
@torch.no_grad()
def test_plus_encoder_and_logits_match_reference(plus, frames):
    ref, _, model = plus
    assert model.config.encoder.cat_hidden_layers == PLUS_CAT_LAYERS
    features = torch.randn(1, frames, 160, generator=torch.Generator().manual_seed(frames))
    ids = audio_prompt(frames)[None]
    encoded = model.encoder(features)
    assert encoded.shape == (1, frames, PLUS_WIDTH)
    assert max_err(encoded, ref.model.encoder(features).last_hidden_state) <= 1e-5
    expected = ref(input_ids=ids, input_features=features).logits / LOGITS_SCALING
    assert max_err(model(ids, features), expected) <= 1e-4


def assert_greedy_32_tokens_match(ref, model, seed: int) -> None:
    """32 greedy tokens after a 37-frame audio prompt, as transformers' generate gives them."""
    features = torch.randn(1, 37, 160, generator=torch.Generator().manual_seed(seed))
    ids = audio_prompt(37)
    with torch.no_grad():
        expected = ref.generate(
            input_ids=ids[None],
            input_features=features,
            max_new_tokens=32,
            min_new_tokens=32,
            do_sample=False,
        )[0, len(ids) :].tolist()
    assert len(set(expected)) > 4, "degenerate reference: the test would prove little"
    assert greedy_tokens(model, ids, features, 32, EOS) == expected


def test_plus_greedy_32_tokens_match_reference(plus):
    ref, _, model = plus
    assert_greedy_32_tokens_match(ref, model, seed=1)


@torch.no_grad()
def test_plus_batched_equals_alone(plus):
    _, _, model = plus
    lengths = [37, 9, 22]
    gen = torch.Generator().manual_seed(2)
    clips = [torch.randn(n, 160, generator=gen) for n in lengths]
    prompts = [audio_prompt(n) for n in lengths]
    width, frames = max(map(len, prompts)), max(lengths)
    # Loud noise in the padding: none of it may reach a clip's own outputs.
    features = 100 * torch.randn(len(clips), frames, 160, generator=gen)
    for row, clip in zip(features, clips, strict=True):
        row[: len(clip)] = clip
    ids = torch.stack([F.pad(p, (0, width - len(p))) for p in prompts])
    batched = model(ids, features, encoder_frame_mask(torch.tensor(lengths), frames))
    for row, (clip, prompt) in enumerate(zip(clips, prompts, strict=True)):
        alone = model(prompt[None], clip[None])
        assert max_err(batched[row : row + 1, : len(prompt)], alone) <= 1e-4


def test_plus_loads_through_fms_get_model(plus):
    ref, folder, _ = plus
    model = fms.models.get_model(
        "granite_speech",
        "tiny",
        model_path=str(folder),
        source="hf",
        encoder={"num_layers": 4, "cat_hidden_layers": PLUS_CAT_LAYERS},
        projector={"encoder_hidden_size": PLUS_WIDTH},
    ).eval()
    features = torch.randn(1, 20, 160)
    ids = audio_prompt(20)[None]
    with torch.no_grad():
        expected = ref(input_ids=ids, input_features=features).logits / LOGITS_SCALING
        assert max_err(model(ids, features), expected) <= 1e-4


# --- granite-speech-4.1-2b: the BPE CTC head beside the weights -----------------------------


@pytest.fixture(scope="module")
def granite41(tmp_path_factory):
    ref = reference_model(hf_config(encoder=dict(output_dim=12)), seed=7)
    folder = save_checkpoint(ref, tmp_path_factory.mktemp("g41"))
    head = save_out_llm(folder, VOCAB, HIDDEN, seed=8)
    return ref, head, folder, gsopt.load_model(folder, lora="none")


@pytest.mark.parametrize("frames", FRAMES)
@torch.no_grad()
def test_41_out_llm_and_logits_match_reference(granite41, frames):
    ref, head, _, model = granite41
    assert model.config.encoder.bpe_output_dim == VOCAB
    assert torch.equal(model.encoder.out_llm.weight, head.weight)
    assert torch.equal(model.encoder.out_llm.bias, head.bias)
    features = torch.randn(2, frames, 160, generator=torch.Generator().manual_seed(frames))
    ids = audio_prompt(frames).expand(2, -1)
    ref_encoded = ref.model.encoder(features).last_hidden_state
    encoded = model.encoder(features)
    assert max_err(encoded, ref_encoded) <= 1e-5
    assert max_err(model.encoder.out_llm(encoded), head(ref_encoded)) <= 1e-5
    expected = ref(input_ids=ids, input_features=features).logits / LOGITS_SCALING
    assert max_err(model(ids, features), expected) <= 1e-4


def test_41_greedy_32_tokens_match_reference(granite41):
    ref, _, _, model = granite41
    assert_greedy_32_tokens_match(ref, model, seed=3)


@torch.no_grad()
def test_41_batched_equals_alone(granite41):
    _, _, _, model = granite41
    lengths = [8, 37, 3]
    gen = torch.Generator().manual_seed(4)
    clips = [torch.randn(n, 160, generator=gen) for n in lengths]
    prompts = [audio_prompt(n) for n in lengths]
    width, frames = max(map(len, prompts)), max(lengths)
    features = 100 * torch.randn(len(clips), frames, 160, generator=gen)
    for row, clip in zip(features, clips, strict=True):
        row[: len(clip)] = clip
    ids = torch.stack([F.pad(p, (0, width - len(p))) for p in prompts])
    mask = encoder_frame_mask(torch.tensor(lengths), frames)
    batched = model(ids, features, mask)
    drafts = model.encoder.out_llm(model.encoder(features, mask))
    for row, (clip, prompt) in enumerate(zip(clips, prompts, strict=True)):
        alone = model(prompt[None], clip[None])
        assert max_err(batched[row : row + 1, : len(prompt)], alone) <= 1e-4
        alone_drafts = model.encoder.out_llm(model.encoder(clip[None]))
        assert max_err(drafts[row : row + 1, : len(clip)], alone_drafts) <= 1e-5


def test_41_sharded_with_stale_shard_loads_through_fms_get_model(tmp_path):
    ref = reference_model(seed=9)
    folder = save_checkpoint(ref, tmp_path, max_shard_size="100KB")
    head = save_out_llm(folder, VOCAB, HIDDEN, seed=10)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    stale = {}
    for shard in set(index["weight_map"].values()):
        stale.update(load_file(folder / shard))
    # An older revision's shard, sorting first: FMS's glob alone would let it win.
    save_file({k: v + 1 for k, v in stale.items()}, folder / "model-00001-of-00002.safetensors")
    model = fms.models.get_model(
        "granite_speech",
        "tiny",
        model_path=str(folder),
        source="hf",
        encoder={"bpe_output_dim": VOCAB},
    ).eval()
    assert torch.equal(model.encoder.out_llm.weight, head.weight)
    features = torch.randn(1, 16, 160)
    ids = audio_prompt(16)[None]
    with torch.no_grad():
        expected = ref(input_ids=ids, input_features=features).logits / LOGITS_SCALING
        assert max_err(model(ids, features), expected) <= 1e-4


def test_out_llm_with_the_wrong_shape_is_refused(tmp_path):
    folder = save_checkpoint(reference_model(seed=11), tmp_path)
    save_out_llm(folder, VOCAB, HIDDEN + 1)
    expected = (
        rf"out_llm\.safetensors: weight has shape \({VOCAB}, {HIDDEN + 1}\), "
        rf"expected \({VOCAB}, {HIDDEN}\)"
    )
    with pytest.raises(gsopt.GsoptError, match=expected) as excinfo:
        gsopt.load_model(folder)
    one_line_error(excinfo)
    with pytest.raises(gsopt.GsoptError, match=expected):
        fms.models.get_model("granite_speech", "tiny", model_path=str(folder), source="hf")


# --- granite-speech-5.0-470m-turboctc: encoder-only CTC -------------------------------------


@pytest.fixture(scope="module")
def ctc_checkpoint(tmp_path_factory):
    ref = reference_ctc_model(TINY_CTC, seed=12)
    folder = tmp_path_factory.mktemp("ctc")
    ref.save_pretrained(folder)
    return ref, folder, gsopt.load_model(folder)


# Odd and even counts around each halving (T -> T // 2 -> T // 4), under, at and over the
# 8-frame attention block at each rate.
@pytest.mark.parametrize("frames", [4, 5, 8, 9, 16, 17, 35, 67, 70])
@torch.no_grad()
def test_ctc_logits_and_transcript_match_reference(ctc_checkpoint, frames):
    ref, _, model = ctc_checkpoint
    assert isinstance(model, GraniteSpeechCTC)
    features = torch.randn(1, frames, 320, generator=torch.Generator().manual_seed(frames))
    expected = ref(input_features=features).logits
    logits = model(features)
    assert logits.shape == (1, frames // 4, TINY_CTC.vocab_size)
    assert max_err(model.encoder(features), ref.encoder(features).last_hidden_state) <= 1e-5
    assert max_err(logits, expected) <= 1e-5
    assert ctc_greedy_decode(logits) == reference_transcripts(ref, features)


@torch.no_grad()
def test_ctc_batched_equals_alone_and_reference_batch(ctc_checkpoint):
    ref, _, model = ctc_checkpoint
    lengths = torch.tensor([67, 9, 35, 70, 4])
    frames = int(lengths.max())
    gen = torch.Generator().manual_seed(13)
    clips = [torch.randn(1, n, 320, generator=gen) for n in lengths.tolist()]
    features = 100 * torch.randn(len(clips), frames, 320, generator=gen)
    for row, clip in zip(features, clips, strict=True):
        row[: clip.shape[1]] = clip[0]
    mask = encoder_frame_mask(lengths, frames)
    logits = model(features, mask)
    out_lengths = model.output_lengths(lengths)
    transcripts = ctc_greedy_decode(logits, out_lengths)
    expected = ref(input_features=features, attention_mask=mask.long()).logits
    for row, clip in enumerate(clips):
        n = int(out_lengths[row])
        alone = model(clip)
        assert alone.shape[1] == n
        assert max_err(logits[row : row + 1, :n], alone) <= 1e-5
        assert max_err(logits[row, :n], expected[row, :n]) <= 1e-5
        assert transcripts[row] == ctc_greedy_decode(alone)[0]
    assert transcripts == reference_transcripts(ref, features, mask.long())


def test_ctc_loads_through_fms_get_model(ctc_checkpoint):
    ref, folder, _ = ctc_checkpoint
    model = fms.models.get_model(
        "granite_speech5_ctc", "tiny-ctc", model_path=str(folder), source="hf"
    ).eval()
    features = torch.randn(2, 35, 320)
    with torch.no_grad():
        assert max_err(model(features), ref(input_features=features).logits) <= 1e-5


def test_ctc_batch_norm_stays_float32(ctc_checkpoint):
    _, folder, _ = ctc_checkpoint
    bf16 = gsopt.load_model(folder, dtype=torch.bfloat16)
    norms = [m for m in bf16.modules() if isinstance(m, FP32BatchNorm1d)]
    assert norms and all(
        t.dtype == torch.float32
        for m in norms
        for t in m.state_dict().values()
        if t.is_floating_point()
    )
    assert bf16.encoder.input_linear.weight.dtype == torch.bfloat16
    fp32 = gsopt.load_model(folder)
    stats = fp32.encoder.layers[0].conv.norm.running_var.clone()
    fp32.to(torch.bfloat16)  # a model-wide cast keeps the float32 values, unrounded
    assert torch.equal(fp32.encoder.layers[0].conv.norm.running_var, stats)
    out = fp32(torch.randn(1, 35, 320))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_ctc_greedy_decode_collapses_repeats_drops_blanks_and_padding():
    labels = torch.tensor([[0, 3, 3, 0, 3, 5, 5, 2, 2], [4, 4, 0, 4, 7, 7, 7, 0, 0]])
    logits = F.one_hot(labels, 8).float()
    assert ctc_greedy_decode(logits) == [[3, 3, 5, 2], [4, 4, 7]]
    assert ctc_greedy_decode(logits, torch.tensor([6, 4])) == [[3, 3, 5], [4, 4]]
    assert ctc_greedy_decode(logits, blank=3) == [[0, 0, 5, 2], [4, 0, 4, 7, 0]]


# --- the 5.0 frontend: log-mels + deltas, pairs stacked --------------------------------------


def reference_delta_features(audio: np.ndarray) -> np.ndarray:
    """GraniteSpeech5FeatureExtractor's recipe for one clip, in float64 numpy + librosa."""
    librosa = pytest.importorskip("librosa")
    filters = librosa.filters.mel(sr=16000, n_fft=512, n_mels=80, htk=True, norm=None)
    mel_frames = len(audio) // 160
    num_frames = 2 * -(-mel_frames // 2)
    audio = audio.astype(np.float64)
    needed = (num_frames - 1) * 160 + 1
    audio = np.pad(audio, (0, max(0, needed - len(audio))))
    padded = np.pad(audio, 256, mode="reflect")
    frames = padded[np.arange(num_frames)[:, None] * 160 + np.arange(512)[None, :]]
    window = np.zeros(512)
    window[56:456] = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 400)  # periodic Hann
    power = np.abs(np.fft.rfft(frames * window, axis=-1)) ** 2
    logmel = np.log10(np.maximum(power @ filters.T.astype(np.float64), 1e-10))
    logmel = np.maximum(logmel, logmel.max() - 8.0) / 4.0 + 1.0
    # The delta regression over N = 1 frame each side, edges replicated:
    # d_t = sum_k k * (c_{t+k} - c_{t-k}) / (2 * sum_k k^2)
    n = 1
    edged = np.concatenate([logmel[:1].repeat(n, 0), logmel, logmel[-1:].repeat(n, 0)])
    ks = range(1, n + 1)
    deltas = sum(
        k * (edged[n + k : n + k + num_frames] - edged[n - k : n - k + num_frames]) for k in ks
    )
    deltas /= 2 * sum(k * k for k in ks)
    return np.concatenate([logmel, deltas], axis=1).reshape(num_frames // 2, 320)


# Whole seconds, odd multiples of the hop (where the extractor pads one zero sample), odd
# and even mel counts, a hop past 256, the shortest torch reflect pad takes.
DELTA_LENGTHS = [16000, 16160, 3360, 480, 12345, 4801, 16159, 257, 48000]


@pytest.mark.parametrize("num_samples", DELTA_LENGTHS)
def test_delta_frontend_matches_numpy_librosa_reference(num_samples):
    audio = speechlike(num_samples, seed=num_samples)
    features, lengths = LogMelDeltaFrontend()(torch.from_numpy(audio)[None])
    expected = reference_delta_features(audio)
    assert features.shape == (1, *expected.shape)
    assert lengths.tolist() == [expected.shape[0]] == [num_feature_frames(num_samples)]
    np.testing.assert_allclose(features[0].double().numpy(), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("num_samples", [16000, 16160, 12345])
def test_delta_frontend_matches_transformers_extractor(num_samples):
    pytest.importorskip("torchaudio")
    from transformers import GraniteSpeech5FeatureExtractor

    audio = torch.from_numpy(speechlike(num_samples, seed=2))
    expected = GraniteSpeech5FeatureExtractor()([audio], sampling_rate=16000)["input_features"]
    features, _ = LogMelDeltaFrontend()(audio[None])
    torch.testing.assert_close(features, expected, rtol=0, atol=1e-4)


@torch.no_grad()
def test_waveforms_to_transcripts_batched_equal_alone(ctc_checkpoint):
    """Frontend and model together: a clip padded with noise in a batch reads as alone."""
    _, _, model = ctc_checkpoint
    frontend = LogMelDeltaFrontend()
    clips = [torch.from_numpy(speechlike(n, seed=i)) for i, n in enumerate(DELTA_LENGTHS)]
    batch = torch.randn(len(clips), max(map(len, clips)))
    for row, clip in zip(batch, clips, strict=True):
        row[: len(clip)] = clip
    features, feature_lengths = frontend(batch, torch.tensor([len(c) for c in clips]))
    mask = encoder_frame_mask(feature_lengths, features.shape[1])
    transcripts = ctc_greedy_decode(model(features, mask), model.output_lengths(feature_lengths))
    for row, (clip, transcript) in enumerate(zip(clips, transcripts, strict=True)):
        alone, alone_lengths = frontend(clip[None])
        assert max_err(features[row : row + 1, : alone.shape[1]], alone) <= 1e-5
        assert torch.all(features[row, alone.shape[1] :] == 0)
        if alone.shape[1] < TINY_CTC.time_reduction:
            assert transcript == []  # no output frame; alone, the model refuses the clip
            continue
        lengths = model.output_lengths(alone_lengths)
        assert transcript == ctc_greedy_decode(model(alone), lengths)[0]
    assert sum(map(len, transcripts)) > 10, "degenerate transcripts: the test would prove little"


# --- configurations, sizes, refusals --------------------------------------------------------


@pytest.mark.parametrize(
    "variant,billions", [("4.1-2b", 2.31), ("4.1-2b-plus", 2.32), ("5.0-470m", 0.473)]
)
def test_variant_sizes_on_meta(variant, billions):
    config = gsopt.get_variant(variant)
    with torch.device("meta"):
        model = (GraniteSpeechCTC if variant == "5.0-470m" else gsopt.GraniteSpeech)(config)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count / 1e9 - billions) < 0.005 * billions
    assert all(p.is_meta for p in model.parameters())


def test_plus_variant_exports_block_3():
    config = gsopt.get_variant("4.1-2b-plus")
    assert config.encoder.cat_hidden_layers == (3,)
    assert config.projector.encoder_hidden_size == 2 * config.encoder.hidden_dim


@pytest.mark.parametrize("variant", sorted(CTC_VARIANTS))
def test_ctc_hf_config_round_trip(variant):
    config = CTC_VARIANTS[variant]
    assert from_hf_config(to_hf_config(config).to_dict()) == config


def test_ctc_variant_through_load_model():
    model = gsopt.load_model("tiny-ctc")
    assert isinstance(model, GraniteSpeechCTC) and not model.training
    assert model(torch.randn(1, 35, 320)).shape == (1, 8, TINY_CTC.vocab_size)


def test_cat_hidden_layers_out_of_range_is_refused():
    hf = plus_hf_config().to_dict()
    hf["encoder_config"]["cat_hidden_layers"] = [0, 4]
    with pytest.raises(
        gsopt.GsoptError,
        match=r"cat_hidden_layers \[0, 4\] has 4: expected distinct indices in 0\.\.3",
    ) as excinfo:
        from_hf_config(hf)
    one_line_error(excinfo)


def test_projector_width_must_match_the_concatenation():
    hf = plus_hf_config().to_dict()
    hf["projector_config"]["encoder_hidden_size"] = HIDDEN
    with pytest.raises(
        gsopt.GsoptError, match=rf"encoder_hidden_size is {HIDDEN}, expected {PLUS_WIDTH}"
    ) as excinfo:
        from_hf_config(hf)
    one_line_error(excinfo)
    assert PLUS_ENCODER["num_layers"] == 4  # the range in the previous test


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("num_key_value_heads", 1, r"num_key_value_heads is 1, expected 2"),
        ("hidden_act", "gelu", r"hidden_act is 'gelu', expected 'silu'"),
        ("conv_kernel_size", 6, r"conv_kernel_size is 6, expected an odd size"),
        ("subsample_layers", [0, 9], r"subsample_layers \[0, 9\] has 9"),
    ],
)
def test_ctc_config_json_refusals(field, value, match):
    hf = to_hf_config(TINY_CTC).to_dict()
    hf["encoder_config"][field] = value
    with pytest.raises(gsopt.GsoptError, match=match) as excinfo:
        from_hf_config(hf)
    one_line_error(excinfo)


def test_mask_over_audio_tokens_is_refused(plus, ctc_checkpoint):
    """transformers' processor marks audio tokens; gsopt's masks mark feature frames."""
    _, _, model = plus
    features = torch.randn(1, 37, 160)
    ids = audio_prompt(37)[None]
    token_mask = torch.ones(1, int((ids == AUDIO_TOKEN_ID).sum()), dtype=torch.bool)
    with pytest.raises(
        gsopt.GsoptError, match=r"input_features_mask has shape \(1, 9\), expected \(1, 37\)"
    ) as excinfo:
        model(ids, features, token_mask)
    one_line_error(excinfo)
    _, _, ctc = ctc_checkpoint
    with pytest.raises(
        gsopt.GsoptError, match=r"input_features_mask has shape \(1, 8\), expected \(1, 35\)"
    ):
        ctc(torch.randn(1, 35, 320), torch.ones(1, 8, dtype=torch.bool))


def test_ctc_input_shorter_than_one_output_frame_is_refused(ctc_checkpoint):
    _, _, ctc = ctc_checkpoint
    with pytest.raises(gsopt.GsoptError, match=r"has 3 frame\(s\), expected at least 4") as err:
        ctc(torch.randn(1, 3, 320))
    one_line_error(err)


def test_delta_frontend_short_input():
    frontend = LogMelDeltaFrontend()
    with pytest.raises(gsopt.GsoptError, match="100 samples, expected at least 160") as err:
        frontend(torch.randn(1, 100))
    one_line_error(err)
    features, lengths = frontend(torch.randn(2, 1000), torch.tensor([1000, 100]))
    assert lengths.tolist() == [3, 0] and torch.all(features[1] == 0)
