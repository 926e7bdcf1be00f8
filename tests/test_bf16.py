"""The `bf16` recipe: every stage in bfloat16, how far that moves an fp32 model, one decode
graph, the note on a CPU without BF16 dot products, and the one-row kernel (bf16 and fp32)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import AUDIO_TOKEN_ID
from torch import nn
from torch._inductor.utils import run_and_get_code

import gsopt
from gsopt.engine.cpu_linear import OneDNNLinear
from gsopt.engine.pipeline import Pipeline, Stages
from gsopt.kernels.cpu_kernels import has_gemv
from gsopt.measure.accuracy import teacher_forced
from gsopt.recipe import apply, build, load_recipe
from gsopt.recipe.settings import lossy_reasons
from gsopt.runtime import has_bf16_dot

TEMPLATE = [5, 6, AUDIO_TOKEN_ID, 7, 8, 9]


def waves():
    torch.manual_seed(0)
    return [torch.randn(16000), torch.randn(7000)]


def test_bf16_recipe_casts_every_stage_and_stays_close():
    torch._dynamo.reset()
    reference = gsopt.load_model("tiny", seed=1, lora="none")
    model = gsopt.load_model("tiny", seed=1, lora="none")
    stages = apply(model, load_recipe("bf16"))
    assert {p.dtype for p in model.parameters() if p.is_floating_point()} == {torch.bfloat16}
    tokens = Pipeline(reference, Stages.eager(reference))(waves(), TEMPLATE, 12)
    ours = Pipeline(model, stages)(waves(), TEMPLATE, 12)
    assert ours.shape == tokens.shape
    assert stages.decode.graphs == 1 and stages.decode.graph_breaks == 0
    moved = teacher_forced(reference, model, waves(), TEMPLATE, tokens)
    assert moved["kl_median"] < 1e-2 and moved["logits_rel_rms_median"] < 0.1
    # bf16 keeps 8 bits of mantissa: the comparison sees it move
    assert moved["logits_rel_rms_median"] > 1e-4
    has_note = any("BF16 dot products" in note for note in stages.report.notes)
    assert has_note == (not has_bf16_dot())


def test_a_cpu_without_bf16_units_gets_a_note(monkeypatch):
    """The note's condition, on this machine whatever its units (the flag query is the only
    stand-in: no CPU here lacks them on demand)."""
    monkeypatch.setattr(build, "has_bf16_dot", lambda: False)
    stages = apply(gsopt.load_model("tiny", seed=1, lora="none"), load_recipe("bf16"))
    assert any("no BF16 dot products" in note for note in stages.report.notes)
    fp32 = apply(gsopt.load_model("tiny", seed=1, lora="none"), load_recipe("compile-decoder"))
    assert not any("BF16" in note for note in fp32.report.notes)


def test_best_runs_bf16_on_a_cpu_with_bf16_units_and_says_it_is_not_float32():
    best = load_recipe("best")
    assert best.devices["cpu-bf16"].linear == best.devices["cpu"].linear == "onednn"
    assert best.devices["cpu"].dtype is None
    stages = apply(gsopt.load_model("tiny", seed=1, lora="none"), best)
    said = [note for note in stages.report.notes if "[cpu-bf16]" in note]
    if has_bf16_dot():
        assert best.for_device("cpu").dtype == "bfloat16"
        assert said and "not float32: lossy" in said[0]
        assert lossy_reasons(best, torch.float32, "cpu") == ["casts the weights to bfloat16"]
    else:
        assert best.for_device("cpu") is best.devices["cpu"] and not said
    # A bf16 model runs [cpu-bf16] losslessly: nothing to say.
    model = gsopt.load_model("tiny", seed=1, lora="none", dtype=torch.bfloat16)
    assert not any("[cpu-bf16]" in note for note in apply(model, best).report.notes)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("rows", "cols"), [(256, 1024), (130, 100)])
def test_gemv_matches_float64(rows, cols, dtype):
    """gsopt's one-row product (BF16 dot products, or fp32 FMAs): whole unrolled steps of k,
    single vectors and a scalar remainder."""
    if not has_gemv(dtype):
        pytest.skip(f"gsopt's CPU kernels take no {dtype} rows here")
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(rows, cols, generator=generator).to(dtype)
    x = torch.randn(1, 1, cols, generator=generator).to(dtype)
    expected = x.double() @ weight.double().t()
    got = torch.ops.gsopt_cpu.gemv(x, weight)
    assert got.dtype == dtype and got.shape == (1, 1, rows)
    # fp32 sums of exact products (rounded to bf16 for bf16 rows)
    tolerance = 8e-3 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(
        got.double(), expected, rtol=tolerance, atol=tolerance * expected.abs().max()
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_compiled_row_takes_the_gemv_kernel(dtype):
    """A decode step's one-row products of a oneDNN linear that keeps its plain weight run
    gsopt's kernel in compiled code; without the plain weight, or for two rows, oneDNN's op."""
    if not has_gemv(dtype):
        pytest.skip(f"gsopt's CPU kernels take no {dtype} rows here")
    for keep_plain, rows, expected in ((True, 1, True), (False, 1, False), (True, 2, False)):
        torch._dynamo.reset()
        linear = OneDNNLinear(nn.Linear(64, 96, bias=False).to(dtype), keep_plain=keep_plain)
        x = torch.randn(1, rows, 64, dtype=dtype)
        plain = linear.plain if keep_plain else None
        with torch.no_grad():
            out, codes = run_and_get_code(torch.compile(linear), x)
        if plain is not None:
            torch.testing.assert_close(out, F.linear(x, plain), rtol=1e-2, atol=1e-2)
        assert ("gsopt_cpu.gemv" in "\n".join(codes)) == expected
