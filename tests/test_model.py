"""gsopt's Granite Speech against transformers' reference, stage by stage (CPU, fp32)."""

from __future__ import annotations

import json
import shutil

import fms.models
import pytest
import torch
from helpers import (
    AUDIO_TOKEN_ID,
    REAL_WIDTH_ENCODER,
    add_lora,
    hf_config,
    reference_model,
    save_checkpoint,
)
from safetensors.torch import load_file, save_file

import gsopt
from gsopt.engine import fms_decode
from gsopt.engine.generate import generate
from gsopt.model.config import from_hf_config, to_hf_config
from gsopt.model.encoder import encoder_frame_mask

LOGITS_SCALING = 4.0  # transformers 5.x returns logits * this; gsopt divides as Granite does


def audio_prompt(num_frames: int, prefix=(5, 6), suffix=(7, 8, 9)) -> torch.Tensor:
    audio_tokens = -(-num_frames // 15) * 3
    return torch.tensor([*prefix, *[AUDIO_TOKEN_ID] * audio_tokens, *suffix])


def assert_logits_match(model, ref, num_frames: int) -> None:
    """One clip through both models: gsopt's logits equal transformers' (unscaled)."""
    ids = audio_prompt(num_frames)[None]
    features = torch.randn(1, num_frames, 160)
    with torch.no_grad():
        expected = ref(input_ids=ids, input_features=features).logits / LOGITS_SCALING
        assert (model(ids, features) - expected).abs().max() <= 1e-4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    ref = reference_model()
    lora = add_lora(ref)
    folder = save_checkpoint(ref, tmp_path_factory.mktemp("tiny"), lora=lora)
    return ref, lora, folder


@pytest.mark.parametrize("num_frames", [5, 8, 37])  # < one block, one block, blocks + remainder
def test_stages_and_logits_match_reference(checkpoint, num_frames):
    ref, lora, folder = checkpoint
    model = gsopt.load_model(folder, lora="live")
    torch.manual_seed(num_frames)
    features = torch.randn(2, num_frames, 160)
    ids = audio_prompt(num_frames).expand(2, -1)
    with torch.no_grad():
        ref_encoded = ref.model.encoder(features).last_hidden_state
        ref_projected = ref.model.projector(ref_encoded)
        encoded = model.encoder(features)
        projected = model.projector(encoded)
        ref_logits = ref(input_ids=ids, input_features=features).logits / LOGITS_SCALING
        logits = model(ids, features)
    assert (encoded - ref_encoded).abs().max() <= 1e-5
    assert (projected - ref_projected).abs().max() <= 1e-5
    assert (logits - ref_logits).abs().max() <= 1e-4


@pytest.mark.parametrize("num_frames", [150, 200, 450])
def test_real_width_encoder_matches_reference(tmp_path, num_frames):
    ref = reference_model(hf_config(encoder=REAL_WIDTH_ENCODER, tie_word_embeddings=True))
    model = gsopt.load_model(save_checkpoint(ref, tmp_path), lora="none")
    features = torch.randn(1, num_frames, 160)
    ids = audio_prompt(num_frames)[None]
    with torch.no_grad():
        ref_encoded = ref.model.encoder(features).last_hidden_state
        ref_logits = ref(input_ids=ids, input_features=features).logits / LOGITS_SCALING
        assert (model.encoder(features) - ref_encoded).abs().max() <= 1e-5
        assert (model(ids, features) - ref_logits).abs().max() <= 1e-4


@pytest.mark.parametrize("kv_cache", ["dynamic", "static"])
def test_greedy_32_tokens_match_reference_generate(checkpoint, kv_cache):
    ref, lora, folder = checkpoint
    model = gsopt.load_model(folder, lora="live")
    torch.manual_seed(0)
    features = torch.randn(1, 37, 160)
    ids = audio_prompt(37)[None]
    with torch.no_grad():
        expected = ref.generate(
            input_ids=ids,
            input_features=features,
            max_new_tokens=32,
            min_new_tokens=32,
            do_sample=False,
        )[0, ids.shape[1] :]
        audio = model.embed_audio(features)
    assert len(set(expected.tolist())) > 4, "degenerate reference: the test would prove little"
    decode = generate if kv_cache == "static" else fms_decode.generate
    tokens = decode(model, [ids[0]], audio, 32, stop_at_eos=False)
    assert tokens[0].tolist() == expected.tolist()


def test_lora_live_text_only_and_merged(checkpoint):
    ref, lora, folder = checkpoint
    live = gsopt.load_model(folder, lora="live")
    merged = gsopt.load_model(folder, lora="merged")
    no_lora = gsopt.load_model(folder, lora="none")
    features = torch.randn(1, 20, 160)
    ids = audio_prompt(20)[None]
    text_ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        with_audio = ref(input_ids=ids, input_features=features).logits / LOGITS_SCALING
        with lora.disable_adapter():
            text_only = ref(input_ids=text_ids).logits / LOGITS_SCALING
            without_lora = ref(input_ids=ids, input_features=features).logits / LOGITS_SCALING
        assert (with_audio - without_lora).abs().max() > 1e-2, "the LoRA must matter"
        assert (live(ids, features) - with_audio).abs().max() <= 1e-4
        assert (live(text_ids) - text_only).abs().max() <= 1e-4
        assert (merged(ids, features) - live(ids, features)).abs().max() <= 1e-4
        assert (no_lora(ids, features) - without_lora).abs().max() <= 1e-4


def test_batched_clips_equal_each_clip_alone(checkpoint):
    _, _, folder = checkpoint
    model = gsopt.load_model(folder, lora="live")
    lengths = [37, 9, 22]
    clips = [torch.randn(n, 160) for n in lengths]
    prompts = [audio_prompt(n) for n in lengths]
    width, frames = max(map(len, prompts)), max(lengths)
    features = torch.stack([torch.nn.functional.pad(c, (0, 0, 0, frames - len(c))) for c in clips])
    ids = torch.stack([torch.nn.functional.pad(p, (0, width - len(p))) for p in prompts])
    frame_mask = encoder_frame_mask(torch.tensor(lengths), frames)
    with torch.no_grad():
        batched = model(ids, features, frame_mask)
        for row, (clip, prompt) in enumerate(zip(clips, prompts, strict=True)):
            alone = model(prompt[None], clip[None])
            assert (batched[row, : len(prompt)] - alone[0]).abs().max() <= 1e-4
        tokens = generate(
            model, prompts, model.embed_audio(features, frame_mask), 12, stop_at_eos=False
        )
        for row, (clip, prompt) in enumerate(zip(clips, prompts, strict=True)):
            alone = generate(model, [prompt], model.embed_audio(clip[None]), 12, stop_at_eos=False)
            assert tokens[row].tolist() == alone[0].tolist()


def test_sharded_checkpoint_with_stale_shard(tmp_path):
    ref = reference_model(hf_config(tie_word_embeddings=True), seed=3)
    folder = save_checkpoint(ref, tmp_path / "ckpt", max_shard_size="100KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    # A stale shard from an older revision: same keys, other values, not in the index.
    stale = {k: v + 1 for k, v in load_file(folder / shards[0]).items()}
    save_file(stale, folder / "model-00001-of-00009.safetensors")
    assert_logits_match(gsopt.load_model(folder, lora="none"), ref, 30)


# Key layouts a Granite Speech checkpoint comes in: the hub's (transformers 4.x and 5.24's
# save_pretrained), 5.x's module names, and transformers 5.17's save_pretrained.
LAYOUTS = {
    "hub": lambda k: k,
    "module-names": lambda k: (
        "lm_head." + k.removeprefix("language_model.lm_head.")
        if k.startswith("language_model.lm_head.")
        else "model." + k.replace("language_model.model.", "language_model.", 1)
    ),
    "transformers-5.17": lambda k: k.replace(
        "language_model.model.", "language_model.model.model.", 1
    ),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_key_layout_loads_the_same_weights(tmp_path, layout):
    ref = reference_model(seed=6)
    folder = save_checkpoint(ref, tmp_path)
    # The hub's layout, whichever transformers wrote the file.
    weights = {
        k.replace("language_model.model.model.", "language_model.model.", 1): v
        for k, v in load_file(folder / "model.safetensors").items()
    }
    assert any(k.startswith("language_model.model.layers.") for k in weights)
    save_file({LAYOUTS[layout](k): v for k, v in weights.items()}, folder / "model.safetensors")
    assert_logits_match(gsopt.load_model(folder, lora="none"), ref, 20)


def test_loader_errors_name_the_problem(tmp_path):
    ref = reference_model(seed=4)
    folder = save_checkpoint(ref, tmp_path / "sharded", max_shard_size="100KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    missing_shard = sorted(set(index["weight_map"].values()))[-1]
    (folder / missing_shard).unlink()
    with pytest.raises(gsopt.GsoptError, match=missing_shard):
        gsopt.load_model(folder)

    single = save_checkpoint(ref, tmp_path / "single")
    weights = load_file(single / "model.safetensors")
    weights["encoder.input_linear.weight"] = torch.zeros(7, 160)
    save_file(weights, single / "model.safetensors")
    with pytest.raises(gsopt.GsoptError, match=r"encoder\.input_linear\.weight.*\(7, 160\)"):
        gsopt.load_model(single)

    del weights["encoder.input_linear.weight"]
    save_file(weights, single / "model.safetensors")
    with pytest.raises(gsopt.GsoptError, match=r"missing 1 weight.*encoder\.input_linear\.weight"):
        gsopt.load_model(single)

    with pytest.raises(gsopt.GsoptError, match="neither a variant"):
        gsopt.load_model(tmp_path / "nowhere")


def test_fms_get_model_tiny_and_hf_source(tmp_path):
    model = fms.models.get_model("granite_speech", "tiny").eval()
    assert isinstance(model, gsopt.GraniteSpeech)
    ids = audio_prompt(16)[None]
    assert model(ids, torch.randn(1, 16, 160)).shape == (1, ids.shape[1], 320)

    ref = reference_model(seed=5)  # helpers' tiny config is the `tiny` variant
    folder = save_checkpoint(ref, tmp_path, max_shard_size="100KB")
    # Stale shards of an older revision, named to sort before the current ones (as a real
    # 3.3-2b snapshot's -of-00003 set sorts before its -of-00004 set): FMS's glob alone
    # would let their values win.
    stale = {}
    for shard in json.loads((folder / "model.safetensors.index.json").read_text())[
        "weight_map"
    ].values():
        stale.update(load_file(folder / shard))
    save_file({k: v + 1 for k, v in stale.items()}, folder / "model-00001-of-00002.safetensors")
    loaded = fms.models.get_model("granite_speech", "tiny", model_path=str(folder), source="hf")
    loaded.eval()  # BatchNorm: FMS returns models in training mode
    assert_logits_match(loaded, ref, 16)


@pytest.mark.parametrize(
    "variant,billions", [("3.3-2b", 3.0), ("3.3-8b", 8.6), ("cpu-real-width", 0.317)]
)
def test_variant_sizes_on_meta(variant, billions):
    with torch.device("meta"):
        model = gsopt.GraniteSpeech(gsopt.get_variant(variant))
    model.post_init()  # ties the head to the embedding, as the checkpoints do
    count = sum(p.numel() for p in model.parameters())
    assert abs(count / 1e9 - billions) < 0.01 * max(billions, 1)
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("variant", sorted(gsopt.VARIANTS))
def test_hf_config_round_trip(variant):
    config = gsopt.get_variant(variant)
    hf = to_hf_config(config).to_dict()
    back = from_hf_config(hf, {"r": config.lora_rank, "lora_alpha": config.lora_alpha})
    assert back == config


def test_config_json_is_read_not_assumed(tmp_path):
    ref = reference_model(hf_config(encoder=dict(num_layers=3, output_dim=11)), seed=6)
    folder = save_checkpoint(ref, tmp_path)
    model = gsopt.load_model(folder)
    assert model.config.encoder.num_layers == 3 and model.config.encoder.output_dim == 11
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "llama"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(gsopt.GsoptError, match="model_type"):
        gsopt.load_model(folder)
    shutil.rmtree(folder)
