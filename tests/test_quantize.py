"""Weight-only quantized decoder (torchao) on the tiny model: how far it moves the model, one
decode graph, bytes at their stored size, save and reload, and one-line refusals."""

from __future__ import annotations

import json
from importlib import resources

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    AUDIO_TOKEN_ID,
    allocations_of_at_least,
    hf_config,
    reference_model,
    save_checkpoint,
)
from torch._inductor.utils import run_and_get_code

import gsopt
from gsopt.cli import main
from gsopt.commands import bench
from gsopt.engine.cpu_gemv import MAX_ROWS
from gsopt.engine.cpu_int4 import DEQUANTIZE_ROWS, CpuInt4Linear, dequantize, unpack_int4
from gsopt.engine.cpu_int8 import DynamicInt8Linear
from gsopt.engine.generate import decode_one_token, prefill, setup_cache
from gsopt.engine.pipeline import Pipeline, Stages
from gsopt.engine.quantize import is_quantized
from gsopt.kernels import cpu_kernels
from gsopt.measure.accuracy import stage_errors, teacher_forced
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


def int8_weight_only_recipe(tmp_path):
    """int8-decoder with float activations in the prefill too (its CPU form quantizes them)."""
    path = tmp_path / "int8-weight-only.toml"
    text = load_recipe_text("int8-decoder")
    assert 'activations = "int8"' in text
    path.write_text(text.replace('activations = "int8"', 'activations = "float"'))
    return load_recipe(path)


def int4_recipe(tmp_path, group_size: int = 32, activations: str = "int8"):
    """The int4-decoder recipe at a group size that divides the tiny model's width (64), its
    CPU activations int8 (as shipped) or float."""
    path = tmp_path / f"int4-{activations}.toml"
    text = (
        load_recipe_text("int4-decoder")
        .replace("group_size = 128", f"group_size = {group_size}")
        .replace('activations = "int8"', f'activations = "{activations}"')
    )
    path.write_text(text)
    return load_recipe(path)


def load_recipe_text(name: str) -> str:
    return resources.files("gsopt.recipes").joinpath(f"{name}.toml").read_text()


@pytest.mark.parametrize(
    "weights", ["int8-weight-only", "int8", "int8-one-row", "int4", "int4-one-row"]
)
def test_quantized_decoder_stays_close_and_compiles_to_one_graph(weights, tmp_path):
    """Each format this CPU runs: int8 (float32 activations, or int8 ones in the prefill and,
    at batch 1, the decode step) and int4 (torchao's CPU layout, bf16 activations), the lm
    head included in all."""
    torch._dynamo.reset()
    reference = gsopt.load_model("tiny", seed=1, lora="none")
    model = gsopt.load_model("tiny", seed=1, lora="none")
    recipe = {
        "int8-weight-only": lambda: int8_weight_only_recipe(tmp_path),
        "int8": lambda: load_recipe("int8-decoder"),
        "int8-one-row": lambda: load_recipe("int8-decoder"),
        "int4": lambda: int4_recipe(tmp_path),
        "int4-one-row": lambda: int4_recipe(tmp_path),
    }[weights]()
    clips = waves()[:1] if weights.endswith("one-row") else waves()
    if weights.startswith("int4"):  # prompts past 8 rows: the kernel gathers a block once
        clips = [torch.cat([clip] * 6) for clip in clips]
    stages = apply(model, recipe)
    assert is_quantized(model.decoder.head.weight)
    tokens = Pipeline(reference, Stages.eager(reference))(clips, TEMPLATE, 16)
    quantized = Pipeline(model, stages)(clips, TEMPLATE, 16)
    assert stages.decode.graphs == 1 and stages.decode.graph_breaks == 0
    moved = teacher_forced(reference, model, clips, TEMPLATE, tokens)
    assert moved["positions"] == 16 * len(clips)
    assert moved["kl_median"] < 1e-3 and moved["logits_rel_rms_median"] < 0.15
    # the check can see a change: quantization does move the logits
    assert moved["logits_rel_rms_median"] > 1e-4
    assert quantized.shape == tokens.shape


def test_quantized_step_bytes_match_a_hand_count(tmp_path):
    # tiny: emb 64, 2 layers; per layer qkv [128, 64], dense [64, 64], gate+up [256, 64],
    # down [64, 128]; a 320-row lm head, untied from the float32 embedding table.
    layer = [(128, 64), (64, 64), (256, 64), (64, 128)]
    batch, cache_len = 2, 30

    def step_bytes(linear_bytes, itemsize: int) -> int:
        weights = 2 * sum(linear_bytes(out, inp) for out, inp in layer) + linear_bytes(320, 64)
        weights += (2 * 2 + 1) * 64 * itemsize  # two norms per layer, and the final one
        cache = 2 * 2 * batch * cache_len * 32 * itemsize  # K and V of 2 layers
        return weights + batch * 64 * itemsize + cache  # + the embedding rows read

    model = gsopt.load_model("tiny", seed=1, lora="none")
    apply(model, load_recipe("int8-decoder"))
    # int8 data, a float32 scale and an int8 zero point per output row; float32 elsewhere
    int8 = step_bytes(lambda out, inp: out * inp + out * 4 + out, 4)
    assert bench.decode_step_bytes(model, batch, cache_len) == int8

    model = gsopt.load_model("tiny", seed=1, lora="none")
    apply(model, int4_recipe(tmp_path, group_size=32))

    # two int4 values a byte, a bf16 scale and zero point per group of 32 (the lm head too);
    # bf16 elsewhere
    def int4(out: int, inp: int) -> int:
        return out * inp // 2 + (inp // 32) * out * 2 * 2

    expected = step_bytes(int4, 2)
    assert bench.decode_step_bytes(model, batch, cache_len) == expected


def test_int8_activations_take_one_row_and_prefill_rows_and_leave_a_few_weight_only(tmp_path):
    """One row (batch-1 decoding) and more rows than a batched decode step's are rounded to
    int8 per row and multiplied in int8 (VNNI's unsigned-by-signed form where this CPU has
    it); the reference is the same product in float64. Two to MAX_ROWS rows stay
    weight-only, bit for bit."""
    model = gsopt.load_model("tiny", seed=1, lora="none")
    apply(model, load_recipe("int8-decoder"))
    layers = [m for m in model.decoder.modules() if isinstance(m, DynamicInt8Linear)]
    assert len(layers) == 2 * 4 + 1  # qkv, dense, gate+up and down in 2 layers; the lm head
    layer = layers[1]
    torch.manual_seed(0)
    for x in (torch.randn(2, 9, layer.in_features), torch.randn(1, 1, layer.in_features)):
        rows = x.reshape(-1, layer.in_features).double()
        scale = rows.abs().amax(-1, keepdim=True) / 127
        product = (rows / scale).round() @ layer.weight.qdata.double().t()
        expected = product * scale * layer.weight.scale.double().flatten()
        got = layer(x).reshape(-1, layer.out_features).double()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        weight_only = F.linear(x, layer.weight)
        assert not torch.allclose(layer(x), weight_only, rtol=1e-4, atol=1e-4)
    for count in (2, MAX_ROWS):
        few = torch.randn(1, count, layer.in_features)
        assert torch.equal(layer(few), F.linear(few, layer.weight))


@pytest.mark.parametrize("rows", [64 * 3, 64 * 2 + 16])
def test_int4_unpacking_reads_back_the_cpu_kernels_layout(rows):
    """Whole 64-row blocks and a short last block (a padded head's), against the values
    `_convert_weight_to_int4pack_for_cpu` packed."""
    values = torch.randint(
        0, 16, (rows, 256), dtype=torch.int32, generator=torch.Generator().manual_seed(0)
    )
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, 1)
    if packed.shape != (rows, 128):
        pytest.skip(f"this CPU's int4 layout is not AVX-512's ({tuple(packed.shape)})")
    assert torch.equal(unpack_int4(packed, rows, 256).to(torch.int32), values)


def test_int4_prefill_rows_run_on_a_dequantized_weight(tmp_path):
    """With float activations, a prefill's rows multiply the int4 weight dequantized to bf16
    (one GEMM); a decode step's keep torchao's kernel. Both equal the same int4 weight in
    float64, within bf16."""
    model = gsopt.load_model("tiny", seed=1, lora="none")
    apply(model, int4_recipe(tmp_path, activations="float"))
    layers = [m for m in model.decoder.modules() if isinstance(m, CpuInt4Linear)]
    if not layers:
        pytest.skip("this CPU's int4 layout is not AVX-512's: the kernel keeps every row")
    assert len(layers) == 2 * 4 + 1  # qkv, dense, gate+up and down in 2 layers; the lm head
    layer = layers[2]
    weight = layer.weight
    cols = weight.shape[1]
    # the reference: the kernel's own rows (decode-sized products) of an identity, in float64
    identity = torch.eye(cols, dtype=torch.bfloat16)
    reference = torch.cat([F.linear(identity[i : i + 8], weight) for i in range(0, cols, 8)])
    reference = reference.double().t()  # [N, K]: the weight as the kernel dequantizes it
    torch.manual_seed(0)
    for count in (DEQUANTIZE_ROWS, 2, 200):
        x = torch.randn(count, cols, dtype=torch.bfloat16)
        expected = x.double() @ reference.t()
        got = layer(x).double()
        torch.testing.assert_close(got, expected, rtol=0.02, atol=0.02 * expected.abs().max())
    many = torch.randn(DEQUANTIZE_ROWS, cols, dtype=torch.bfloat16)
    # the check can tell the paths apart: the kernel's float32 dequantization differs in bits
    assert not torch.equal(layer(many), F.linear(many, weight))
    # gsopt's C++ unpacking (a slice of columns at a time) and the torch one it falls back
    # to give the same bf16 weight: the products differ only by the GEMM's summation order
    in_torch = F.linear(many, dequantize(weight))
    torch.testing.assert_close(layer(many), in_torch, rtol=0.01, atol=0.01)
    layer.unpack_in_cpp = False
    assert torch.equal(layer(many), in_torch)


@pytest.mark.parametrize(("rows", "cols", "group"), [(192, 256, 32), (64 * 5 + 16, 512, 128)])
def test_int4_kernels_match_their_plain_torch_references(rows, cols, group):
    """gsopt's VNNI kernel against its float64 reference (each row quantized to int8 per
    group), whole 64-row blocks and a short last block, for row counts that take each of its
    paths (weights gathered as they go, up to 8 rows; gathered once per block for more, in
    tiles of 6 and a remainder). It is not the torchao kernel's product (which keeps the rows
    in float) but stays near it. The bf16 prefill op against the torch unpacking's product."""
    from torchao.prototype.quantization.int4.int4_opaque_tensor import Int4OpaqueTensor

    if why := cpu_kernels.unavailable():
        pytest.skip(why)
    generator = torch.Generator().manual_seed(rows)
    weight = Int4OpaqueTensor.from_hp(
        torch.randn(rows, cols, generator=generator).bfloat16(), [1, group]
    )
    values = unpack_int4(weight.qdata, rows, cols)
    for count in (1, 5, 13):
        x = torch.randn(count, cols, generator=generator)
        expected = cpu_kernels.reference(x, values, weight.scale_and_zero, group)
        got = cpu_kernels.int4_int8_linear(weight, x)
        torch.testing.assert_close(
            got.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max()
        )
        # each row's product is the same whichever path and tile it took
        one_by_one = torch.cat([cpu_kernels.int4_int8_linear(weight, row[None]) for row in x])
        assert torch.equal(got, one_by_one)
        kernel = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.bfloat16(), weight.qdata, group, weight.scale_and_zero
        ).double()
        moved = (got.double() - kernel).norm() / kernel.norm()
        assert 1e-4 < moved < 0.03
    # bf16 rows: the same product, rounded to bf16
    torch.testing.assert_close(
        cpu_kernels.int4_int8_linear(weight, x.bfloat16()).float(),
        cpu_kernels.reference(x.bfloat16(), values, weight.scale_and_zero, group).float(),
        rtol=0.01,
        atol=0.01 * expected.abs().max().item(),
    )
    # the prefill op on the same weight: the torch unpacking's product, to bf16 rounding
    many = torch.randn(64, cols, generator=generator).bfloat16()
    expected = F.linear(many, dequantize(weight)).float()
    got = cpu_kernels.int4_linear(weight, many).float()
    torch.testing.assert_close(got, expected, rtol=0.01, atol=0.01 * expected.abs().max())


def test_int4_products_take_the_vnni_kernel_only_where_asked(tmp_path):
    """int4-decoder ([cpu.quantize] activations = "int8") sends every row count to the
    kernel; the same recipe with float activations keeps torchao's kernel for a decode
    step's rows and the bf16 unpacking for a prefill's."""
    if why := cpu_kernels.unavailable():
        pytest.skip(why)
    model = gsopt.load_model("tiny", seed=1, lora="none")
    apply(model, int4_recipe(tmp_path))
    layer = next(m for m in model.decoder.modules() if isinstance(m, CpuInt4Linear))
    torch.manual_seed(0)
    for count in (1, DEQUANTIZE_ROWS):
        x = torch.randn(1, count, layer.in_features, dtype=torch.bfloat16)
        kernel = cpu_kernels.int4_int8_linear(layer.weight, x[0]).view_as(layer(x))
        assert torch.equal(layer(x), kernel)
    plain = gsopt.load_model("tiny", seed=1, lora="none")
    apply(plain, int4_recipe(tmp_path, activations="float"))
    layer = next(m for m in plain.decoder.modules() if isinstance(m, CpuInt4Linear))
    x = torch.randn(1, 1, layer.in_features, dtype=torch.bfloat16)
    assert torch.equal(layer(x), F.linear(x, layer.weight))
    many = torch.randn(DEQUANTIZE_ROWS, layer.in_features, dtype=torch.bfloat16)
    assert torch.equal(layer(many), cpu_kernels.int4_linear(layer.weight, many))


def _decode_step_code(model, step) -> str:
    cache = setup_cache(model, 1, 32, max_seq_len=32)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        token = prefill(model, ids, torch.tensor([[4]]), None, cache.layers).argmax(-1)
        args = (token, torch.tensor([5]), torch.zeros(1, dtype=torch.bool), cache.layers)
        _, codes = run_and_get_code(step, model, *args, cache.span(6, fixed=False))
    return "\n".join(codes)


def test_int8_decode_step_converts_weights_in_registers(tmp_path):
    """torchao computes `x @ qdata.t().to(float32) * scale`; compiled as it is (or through
    inductor's own decomposition, which realizes its inputs) that writes every weight out in
    float32 on every step. gsopt.engine.cpu_gemv fuses the conversion into the product's reduction:
    no buffer the size of a weight is allocated."""
    torch._dynamo.reset()
    model = gsopt.load_model("tiny", seed=1, lora="none")
    stages = apply(model, int8_weight_only_recipe(tmp_path))
    smallest = min(
        m.weight.qdata.numel()
        for m in model.decoder.modules()
        if hasattr(m, "weight") and is_quantized(m.weight)
    )
    assert allocations_of_at_least(_decode_step_code(model, stages.decode), smallest) == []
    # The check can see a conversion: the same step compiled without the pass allocates them.
    torch._dynamo.reset()
    plain = torch.compile(decode_one_token, options={"post_grad_fusion_options": {}})
    assert allocations_of_at_least(_decode_step_code(model, plain), smallest)


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


def test_int4_fits_its_group_size_to_a_narrow_model_and_says_so(capsys):
    """tiny's 64-wide layers take group 64 where int4-decoder asks for 128."""
    capsys.readouterr()
    argv = ["transcribe", "--model", "tiny", "--recipe", "int4-decoder", "--max-new-tokens", "2"]
    assert main([*argv, "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "group_size 128 does not divide every width (64, 128); ran group_size 64" in err


def test_bad_quantization_input_is_one_line(capsys, tmp_path):
    err = one_line_error(capsys, "apply", "--recipe", "fp8-decoder", "--model", "tiny")
    assert "float8" in err and "8.9" in err
    recipe = tmp_path / "int4.toml"
    recipe.write_text('kv_cache = "static"\n[quantize]\nweights = "int4"\ngroup_size = 128\n')
    narrow = save_checkpoint(
        reference_model(hf_config(hidden_size=48, intermediate_size=96)), tmp_path / "w48"
    )
    err = one_line_error(capsys, "apply", "--recipe", str(recipe), "--model", str(narrow))
    assert "group_size = 128 does not divide the width 48" in err and "weights = 'int8'" in err
    odd_vocab = save_checkpoint(reference_model(hf_config(vocab_size=328)), tmp_path / "v328")
    recipe.write_text(
        'kv_cache = "static"\n[quantize]\nweights = "int4"\ngroup_size = 32\nlm_head = true\n'
    )
    model = gsopt.load_model(odd_vocab, lora="none")
    apply(model, load_recipe(recipe))  # a 328-row head: padded to 336 rows, then quantized
    head = model.decoder.head
    assert head.linear.out_features == 336 and is_quantized(head.weight)
    with torch.no_grad():
        assert head(torch.randn(2, 64)).shape == (2, 328)
    recipe.write_text('kv_cache = "static"\n[quantize]\nweights = "int3"\n')
    err = one_line_error(capsys, "transcribe", "--recipe", str(recipe))
    assert "weights = 'int3' is not one of int8, int4, float8" in err


class Payload:
    """An object a weights-only load must refuse to build."""


def test_a_quantized_state_holding_objects_is_refused(capsys, tmp_path):
    saved = tmp_path / "tiny-int8.pt"
    apply(gsopt.load_model("tiny", seed=1, lora="none"), int8_recipe(tmp_path, str(saved)))
    state = torch.load(saved, weights_only=True)
    torch.save({**state, "extra": Payload()}, saved)  # the same weights, plus a pickled object
    recipe = tmp_path / "reuse.toml"
    recipe.write_text(f'kv_cache = "static"\n[quantize]\nweights = "int8"\nsaved = "{saved}"\n')
    err = one_line_error(
        capsys, "transcribe", "--model", "tiny", "--recipe", str(recipe), "--max-new-tokens", "2"
    )
    assert "not a gsopt quantized state (UnpicklingError)" in err


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


def test_int8_encoder_reports_how_far_each_stage_moved(capsys, tmp_path):
    """The lossy report names the audio stages' drift: the int8 encoder's and projector's
    products move their outputs; quantizing only the decoder leaves them exactly as they
    were."""
    capsys.readouterr()
    argv = ["apply", "--model", "tiny", "--recipe", "int8-encoder", "--repeats", "1"]
    assert main([*argv, "--max-new-tokens", "4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    [run] = report if isinstance(report, list) else [report]
    moved = run["accuracy"]["stage_rel_rms"]
    assert 1e-4 < moved["encoder"] < 0.05 and 1e-4 < moved["projector"] < 0.05
    reference = gsopt.load_model("tiny", seed=1, lora="none")
    model = gsopt.load_model("tiny", seed=1, lora="none")
    apply(model, int8_recipe(tmp_path))
    assert stage_errors(reference, model, waves()) == {"encoder": 0.0, "projector": 0.0}


def test_int4_without_gsopts_kernels_keeps_torchaos_with_a_note(monkeypatch, tmp_path):
    """A CPU without AVX512-VBMI/VNNI (or no compiler): the recipe still applies, one-row
    products and prefills keep torchao's kernel and the torch unpacking, and a note says why."""
    from gsopt.engine import cpu_int4

    why = "this CPU lacks avx512vbmi"
    monkeypatch.setattr(cpu_kernels, "unavailable", lambda: why)
    monkeypatch.setattr(cpu_int4, "unavailable", lambda: why)
    model = gsopt.load_model("tiny", seed=1, lora="none")
    stages = apply(model, int4_recipe(tmp_path))
    assert any(why in note for note in stages.report.notes)
    layers = [m for m in model.decoder.modules() if isinstance(m, CpuInt4Linear)]
    if not layers:
        pytest.skip("this CPU's int4 layout is not AVX-512's: the kernel keeps every row")
    layer = layers[0]
    assert not layer.int8_rows and not layer.unpack_in_cpp
    one = torch.randn(1, 1, layer.in_features, dtype=torch.bfloat16)
    assert torch.equal(layer(one), F.linear(one, layer.weight))
    many = torch.randn(DEQUANTIZE_ROWS, layer.in_features, dtype=torch.bfloat16)
    assert torch.equal(layer(many), F.linear(many, dequantize(layer.weight)))
