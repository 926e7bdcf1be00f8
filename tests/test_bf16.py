"""The `bf16` recipe: every stage in bfloat16, how far that moves an fp32 model, one decode
graph, the note on a CPU without BF16 dot products, and the one-row kernel (bf16 and fp32)."""

from __future__ import annotations

import dataclasses

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
from gsopt.measure.accuracy import stage_errors, teacher_forced
from gsopt.recipe import apply, build, load_recipe, settings, transforms
from gsopt.recipe.settings import lossy_reasons
from gsopt.runtime import bf16_gemm_outruns_fp32, has_bf16_dot

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
    """[cpu-bf16]: the decoder in bf16, the audio stages fp32; [cpu-bf16-gemm], where bf16
    GEMMs measure faster than fp32 ones, every stage in bf16. Which ran is said."""
    best = load_recipe("best")
    assert best.devices["cpu-bf16"].linear == best.devices["cpu"].linear == "onednn"
    assert best.devices["cpu"].dtype is None
    assert (best.devices["cpu-bf16"].dtype, best.devices["cpu-bf16"].audio_dtype) == (
        "bfloat16",
        "float32",
    )
    gemm = best.devices["cpu-bf16-gemm"]
    assert (gemm.dtype, gemm.audio_dtype) == ("bfloat16", "bfloat16")
    assert gemm.encoder.backend == "compile"
    model = gsopt.load_model("tiny", seed=1, lora="none")
    stages = apply(model, best)
    said = [note for note in stages.report.notes if "[cpu-bf16" in note]
    runs = best.for_device("cpu")
    if not has_bf16_dot():
        assert runs is best.devices["cpu"] and not said
        return
    audio = torch.bfloat16 if bf16_gemm_outruns_fp32() else torch.float32
    assert runs is best.devices["cpu-bf16-gemm" if audio == torch.bfloat16 else "cpu-bf16"]
    assert model.decoder.head.weight.dtype == torch.bfloat16
    assert {p.dtype for p in model.encoder.parameters()} == {audio}
    assert said and "not float32: lossy" in said[0]
    assert lossy_reasons(best, torch.float32, "cpu")[0].startswith(
        "casts the weights to bfloat16" if audio == torch.bfloat16 else "casts the decoder's"
    )
    # A bf16 model runs the decoder's table losslessly: nothing to say.
    model = gsopt.load_model("tiny", seed=1, lora="none", dtype=torch.bfloat16)
    assert not any("[cpu-bf16" in note for note in apply(model, best).report.notes)


def test_machine_tables_go_from_the_most_specific_kind(monkeypatch):
    """for_device's choice for each answer of the machine probes (stand-ins for CPUs this
    host is not), and the probe itself never claims fast bf16 GEMMs without BF16 units."""
    best = load_recipe("best")
    for bf16, gemm, table in ((True, True, "cpu-bf16-gemm"), (True, False, "cpu-bf16")):
        monkeypatch.setitem(settings.MACHINE_KINDS, "cpu-bf16", lambda bf16=bf16: bf16)
        monkeypatch.setitem(settings.MACHINE_KINDS, "cpu-bf16-gemm", lambda gemm=gemm: gemm)
        assert best.for_device("cpu") is best.devices[table]
        assert best.for_device("cuda") is best.devices["cuda"]
    monkeypatch.setitem(settings.MACHINE_KINDS, "cpu-bf16", lambda: False)
    monkeypatch.setitem(settings.MACHINE_KINDS, "cpu-bf16-gemm", lambda: False)
    assert best.for_device("cpu") is best.devices["cpu"]
    assert not bf16_gemm_outruns_fp32() or has_bf16_dot()


def test_a_bf16_decoder_under_fp32_audio_stages_keeps_their_weights_exact():
    """dtype = "bfloat16" with audio_dtype = "float32": the encoder and projector keep the
    fp32 weights bit for bit (not rounded through bf16), the decoder is bf16, and the
    pipeline hands the fp32 audio rows to the bf16 prefill."""
    torch._dynamo.reset()
    reference = gsopt.load_model("tiny", seed=1, lora="none")
    model = gsopt.load_model("tiny", seed=1, lora="none")
    recipe = dataclasses.replace(load_recipe("static-kv"), dtype="bfloat16", audio_dtype="float32")
    stages = apply(model, recipe)
    for name in ("encoder", "projector"):
        ours, theirs = getattr(model, name).state_dict(), getattr(reference, name).state_dict()
        assert all(torch.equal(ours[key], theirs[key]) for key in theirs)
    assert {p.dtype for p in model.decoder.parameters()} == {torch.bfloat16}
    assert not transforms.CastDtype("bfloat16", "float32").changes(model)
    assert transforms.CastDtype("bfloat16", "float32").changes(reference)
    tokens = Pipeline(reference, Stages.eager(reference))(waves(), TEMPLATE, 12)
    assert Pipeline(model, stages)(waves(), TEMPLATE, 12).shape == tokens.shape
    moved = teacher_forced(reference, model, waves(), TEMPLATE, tokens)
    assert moved["kl_median"] < 1e-2 and moved["logits_rel_rms_median"] > 1e-4
    assert stage_errors(reference, model, waves()) == {"encoder": 0.0, "projector": 0.0}


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
