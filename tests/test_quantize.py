"""Weight-only quantized decoder (torchao) on the tiny model: how far it moves the model, one
decode graph, bytes at their stored size, save and reload, and one-line refusals."""

from __future__ import annotations

import pytest
import torch
from helpers import AUDIO_TOKEN_ID, hf_config, reference_model, save_checkpoint

import gsopt
from gsopt import bench
from gsopt.accuracy import teacher_forced
from gsopt.cli import main
from gsopt.pipeline import Pipeline, Stages
from gsopt.recipe import apply, load_recipe

pytest.importorskip("torchao")

TEMPLATE = [5, 6, AUDIO_TOKEN_ID, 7, 8, 9]


def waves():
    torch.manual_seed(0)
    return [torch.randn(16000), torch.randn(7000)]


def int8_recipe(tmp_path, saved: str = ""):
    path = tmp_path / "int8.toml"
    text = 'kv_cache = "static"\n[decode]\nbackend = "compile"\n[quantize]\nweights = "int8"\n'
    path.write_text(text + (f'saved = "{saved}"\n' if saved else ""))
    return load_recipe(path)


def test_int8_decoder_stays_close_and_compiles_to_one_graph():
    torch._dynamo.reset()
    reference = gsopt.load_model("tiny", seed=1, lora="none")
    model = gsopt.load_model("tiny", seed=1, lora="none")
    stages = apply(model, load_recipe("int8-decoder"))
    tokens = Pipeline(reference, Stages.eager(reference))(waves(), TEMPLATE, 16)
    quantized = Pipeline(model, stages)(waves(), TEMPLATE, 16)
    assert stages.decode.graphs == 1 and stages.decode.graph_breaks == 0
    moved = teacher_forced(reference, model, waves(), TEMPLATE, tokens)
    assert moved["positions"] == 32
    assert moved["kl_median"] < 1e-3 and moved["logits_rel_rms_median"] < 0.05
    # the check can see a change: quantization does move the logits
    assert moved["logits_rel_rms_median"] > 1e-4
    assert (quantized == tokens).float().mean() >= 0.5


def test_quantized_step_bytes_match_a_hand_count():
    model = gsopt.load_model("tiny", seed=1, lora="none")
    apply(model, load_recipe("int8-decoder"))
    # tiny: emb 64, 2 layers; per layer qkv [128, 64], dense [64, 64], gate+up [256, 64],
    # down [64, 128]: int8 data, a float32 scale and an int8 zero point per output row.
    linears = [(128, 64), (64, 64), (256, 64), (64, 128)]
    per_layer = sum(out * inp + out * 4 + out for out, inp in linears) + 2 * 64 * 2  # bf16 norms
    head = 320 * 64 * 2  # the lm head stays bf16 (lm_head = false)
    weights = 2 * per_layer + 64 * 2 + head  # + final norm
    batch, cache_len = 2, 30
    cache = 2 * 2 * batch * cache_len * 32 * 2  # bf16 K and V
    expected = weights + batch * 64 * 2 + cache
    assert bench.decode_step_bytes(model, batch, cache_len) == expected


def test_save_and_reload_give_identical_logits(tmp_path):
    saved = tmp_path / "q" / "tiny-int8.pt"
    first = gsopt.load_model("tiny", seed=1, lora="none")
    apply(first, int8_recipe(tmp_path, str(saved)))
    assert saved.is_file()
    second = gsopt.load_model("tiny", seed=1, lora="none")
    second.decoder.base_model.layers[0].attn.dense.weight.data.mul_(3)  # must be overwritten
    apply(second, int8_recipe(tmp_path, str(saved)))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.equal(first(ids), second(ids))


def one_line_error(capsys, *argv: str) -> str:
    capsys.readouterr()
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_bad_quantization_input_is_one_line(capsys, tmp_path):
    err = one_line_error(capsys, "apply", "--recipe", "fp8-decoder", "--model", "tiny")
    assert "float8" in err and "8.9" in err
    recipe = tmp_path / "int4.toml"
    recipe.write_text('kv_cache = "static"\n[quantize]\nweights = "int4"\ngroup_size = 128\n')
    err = one_line_error(capsys, "transcribe", "--recipe", str(recipe), "--max-new-tokens", "2")
    assert "group_size = 128 does not divide the width 64" in err
    recipe.write_text('kv_cache = "static"\n[quantize]\nweights = "int3"\n')
    err = one_line_error(capsys, "transcribe", "--recipe", str(recipe))
    assert "weights = 'int3' is not one of int8, int4, float8" in err


def test_a_quantized_state_for_another_shape_is_refused(capsys, tmp_path):
    saved = tmp_path / "tiny-int8.pt"
    apply(gsopt.load_model("tiny", seed=1, lora="none"), int8_recipe(tmp_path, str(saved)))
    other = save_checkpoint(reference_model(hf_config(intermediate_size=96)), tmp_path / "o")
    recipe = tmp_path / "reuse.toml"
    recipe.write_text(f'kv_cache = "static"\n[quantize]\nweights = "int8"\nsaved = "{saved}"\n')
    err = one_line_error(
        capsys,
        "apply",
        "--recipe",
        str(recipe),
        "--model",
        str(other),
        "--repeats",
        "1",
        "--out",
        str(tmp_path / "report"),
    )
    assert "has shape" in err and "delete the file" in err
