"""Recipes against eager on the tiny model; compile counts; recipe-file errors; fallbacks."""

from __future__ import annotations

import copy
import json
import os
import re

import pytest
import torch
import torch._dynamo.testing
from helpers import AUDIO_TOKEN_ID

import gsopt
from gsopt.cli import main
from gsopt.engine.pipeline import Pipeline, Stages, baseline_stages
from gsopt.engine.timing import StageTimer
from gsopt.measure.accuracy import logits_along
from gsopt.recipe import apply, builtin_recipes, changes_model, load_recipe
from gsopt.recipe.compile import CompiledStage

TEMPLATE = [5, 6, AUDIO_TOKEN_ID, 7, 8, 9]
CUDA_ONLY = {"cudagraph-decoder", "reduce-overhead"}


def tiny(device="cpu"):
    return gsopt.load_model("tiny", device=device, seed=1)


def waves():
    torch.manual_seed(0)
    return [torch.randn(16000), torch.randn(7000)]


@pytest.fixture(scope="module")
def eager_tokens():
    model = tiny()
    return Pipeline(model, baseline_stages(model))(waves(), TEMPLATE, 24)


def test_builtin_recipes_exist():
    assert set(builtin_recipes()) >= {
        "eager",
        "compile-encoder",
        "compile-decoder",
        "static-kv",
        "cudagraph-decoder",
        "max-autotune",
        "triton-attention",
        "best",
    }


def float32_form(recipe):
    """The recipe as a CPU without BF16 dot products runs it: best's [cpu-bf16] table (tested
    in test_bf16) would make it lossy on one that has them."""
    return recipe.devices.get("cpu", recipe) if "cpu-bf16" in recipe.devices else recipe


# max-autotune is left out: on a 2-core CPU its autotuning takes minutes and proves nothing
# that compile-decoder does not.
@pytest.mark.parametrize(
    "name",
    [
        "static-kv",
        "compile-encoder",
        "compile-decoder",
        "cudagraph-decoder",
        "triton-attention",
        "best",
    ],
)
def test_recipe_tokens_equal_eager(name, eager_tokens):
    torch._dynamo.reset()
    model = tiny()
    recipe = float32_form(load_recipe(name))
    stages = apply(model, recipe)
    tokens = Pipeline(model, stages)(waves(), TEMPLATE, 24)
    assert len(set(eager_tokens[0].tolist())) > 3
    assert torch.equal(tokens, eager_tokens)
    if name in CUDA_ONLY and not torch.cuda.is_available():
        assert any("cudagraph needs CUDA" in note for note in stages.report.notes)


def test_recipe_file_errors(tmp_path):
    cases = {
        'kv_cache = "static"\nwarp_speed = true\n': "unknown key 'warp_speed'.*allowed: name",
        '[decode]\nbackend = "jit"\n': "backend = 'jit' is not one of eager, compile",
        "[encoder]\ncudagraph = true\n": r"unknown key 'cudagraph' in \[encoder\]",
        '[prefill]\nattention = "triton"\n': r"unknown key 'attention' in \[prefill\]",
        '[decode]\nfullgraph = "yes"\n': "fullgraph = 'yes' must be a bool",
        'kv_cache = "paged"\n': "kv_cache = 'paged' is not one of dynamic, static",
        "[decode\n": "not valid TOML",
        "check_every = 0\n": "check_every = 0 must be at least 1",
        "check_every = -3\n": "check_every = -3 must be at least 1",
        "prefill_bucket = 0\n": "prefill_bucket = 0 must be at least 1",
        "prefill_bucket = -5\n": "prefill_bucket = -5 must be at least 1",
        'prefill_bucket = "64"\n': "prefill_bucket = '64' must be a int",
        "max_seq_len = true\n": "max_seq_len = True must be a int",
        '[decode]\nattention = "math"\n': "attention = 'math' is not one of auto, sdpa, triton",
        'kv_cache = "static"\n[decode]\nbackend = "compile"\nmode = "reduce-overhead"\n'
        "cudagraph = true\n": "capture a CUDA graph inside another",
        "[decode]\ncudagraph = true\n": 'needs kv_cache = "static"',
        '[prefill]\nbackend = "compile"\n': 'needs kv_cache = "static"',
    }
    for text, message in cases.items():
        path = tmp_path / "mine.toml"
        path.write_text(text)
        with pytest.raises(gsopt.GsoptError, match=message):
            load_recipe(path)
    with pytest.raises(gsopt.GsoptError, match="unknown recipe 'fastest'.*eager"):
        load_recipe("fastest")


def test_apply_command_writes_reports(tmp_path, capsys):
    out = tmp_path / "report"
    code = main(
        [
            "apply",
            "--recipe",
            "static-kv",
            "--model",
            "tiny",
            "--max-new-tokens",
            "8",
            "--repeats",
            "3",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["tokens_identical"]
    assert [row["stage"] for row in report["stages"]] == [
        "frontend",
        "encoder",
        "projector",
        "prefill",
        "decode",
    ]
    assert all(row["eager_ms"] > 0 and row["recipe_ms"] > 0 for row in report["stages"])
    rows = {row["stage"]: row for row in report["stages"]}
    for stage in ("frontend", "encoder", "projector"):  # static-kv leaves them as they are
        assert rows[stage]["changed"] is False and rows[stage]["speedup"] is None
    for stage in ("prefill", "decode"):
        row = rows[stage]
        assert row["changed"] and row["speedup_p10"] <= row["speedup"] <= row["speedup_p90"]
    assert all(row["compile_s"] == 0 for row in report["stages"])  # nothing compiles
    e2e = report["end_to_end"]
    assert e2e["speedup_p10"] <= e2e["speedup"] <= e2e["speedup_p90"]
    assert "saved_in_changed_stages_ms" in e2e
    assert "| decode" in (out / "report.md").read_text()
    assert not list(out.glob(".*"))  # no temporary files left behind


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_apply_cuda_without_cuda_is_one_line_error(capsys):
    code = main(["apply", "--recipe", "eager", "--device", "cuda"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "no CUDA device" in err


def other_waves():
    torch.manual_seed(1)
    return [torch.randn(5000), torch.randn(21000), torch.randn(12000)]


# Sized for a few device minutes: every capture path in fp32, the two captured recipes in bf16.
GPU_CASES = [
    ("cudagraph-decoder", torch.float32),
    ("reduce-overhead", torch.float32),
    ("triton-attention", torch.float32),
    ("best", torch.float32),
    ("cudagraph-decoder", torch.bfloat16),
    ("best", torch.bfloat16),
]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name,dtype", GPU_CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_gpu_recipes_equal_eager_on_gpu(name, dtype):
    """CUDA graphs and the native Triton kernels on two input shapes (two batch sizes): fp32
    gives eager's tokens exactly; bf16 runs other kernels than eager (rounding differs), so a
    row may leave eager's tokens only where eager itself nearly tied (its top two logits
    within 5% of the largest). No CUDA graph may be skipped."""
    model = gsopt.load_model("tiny", device="cuda", dtype=dtype, seed=1)
    baseline = Pipeline(model, baseline_stages(model))
    recipe_model = copy.deepcopy(model)
    stages = apply(recipe_model, load_recipe(name))
    pipeline = Pipeline(recipe_model, stages)
    for inputs in (waves(), other_waves(), waves()):  # the third call replays the captures
        expected = baseline(inputs, TEMPLATE, 24)
        tokens = pipeline(inputs, TEMPLATE, 24)
        if dtype == torch.float32:
            assert torch.equal(tokens, expected)
        else:
            logits = logits_along(model, inputs, TEMPLATE, expected)
            for row in range(len(inputs)):
                diverged = (tokens[row] != expected[row]).nonzero()
                if len(diverged):
                    at = logits[row, int(diverged[0])]
                    top = at.topk(2).values
                    assert top[0] - top[1] < 0.05 * at.abs().max(), (row, int(diverged[0]))
    step = getattr(stages.decode, "step", stages.decode)
    assert getattr(step, "cudagraph_skips", 0) == 0
    if name in ("cudagraph-decoder", "best"):
        assert stages.decode.captures == 2  # one per batch size, replayed after


def test_pipeline_keeps_live_lora_on_after_a_text_only_call(eager_tokens):
    model = tiny()
    pipeline = Pipeline(model, baseline_stages(model))
    model(torch.tensor([[5, 6, 7]]))  # text only: transformers' rule turns the live LoRA off
    assert torch.equal(pipeline(waves(), TEMPLATE, 24), eager_tokens)


def test_changes_model_says_when_a_copy_is_needed():
    model = tiny()
    assert not changes_model(model, load_recipe("static-kv"))
    assert changes_model(model, load_recipe("best"))  # merges the live LoRA
    assert changes_model(model, load_recipe("triton-attention"))  # swaps encoder attention
    assert changes_model(model, load_recipe("compile-decoder"))  # packs linears on a CPU
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply(model, load_recipe("static-kv"))
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_compiled_stage_counts_graphs_and_recompiles():
    torch._dynamo.reset()
    stage = CompiledStage(lambda x: x.sin() + 1, backend="eager", dynamic=False, fullgraph=True)
    stage(torch.randn(3))
    stage(torch.randn(3))
    assert (stage.graphs, stage.recompiles) == (1, 0)
    stage(torch.randn(5))  # a new static shape: one recompile
    assert (stage.graphs, stage.recompiles, stage.graph_breaks) == (2, 1, 0)


def test_serving_timer_times_the_decode_loop_once():
    """Per-step timing syncs the device every token; the serving timer must not."""
    model = tiny()
    pipeline = Pipeline(model)
    per_step, serving = StageTimer("cpu"), StageTimer("cpu", per_step=False)
    pipeline(waves(), TEMPLATE, 12, timer=per_step)
    pipeline(waves(), TEMPLATE, 12, timer=serving)
    assert len(per_step.times["decode"]) == 11
    assert len(serving.times["decode"]) == 1
    assert len(serving.times["prefill"]) == 1


def test_device_tables_override_per_device(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(
        'kv_cache = "static"\n[decode]\nbackend = "compile"\n'
        "[cuda]\naudio_buckets = true\n[cuda.decode]\ncudagraph = true\n"
        "[cpu]\ncheck_every = 4\n"
    )
    recipe = load_recipe(path)
    cuda, cpu = recipe.for_device("cuda"), recipe.for_device("cpu")
    assert cuda.decode.backend == "compile" and cuda.decode.cudagraph and cuda.audio_buckets
    assert not cpu.decode.cudagraph and not cpu.audio_buckets and cpu.check_every == 4
    assert cpu.name == cuda.name == "mine"
    best = load_recipe("best")
    assert best.for_device("cuda").decode.cudagraph and not best.for_device("cpu").decode.cudagraph
    for text, message in {
        "[cuda]\nwarp = 1\n": r"mine.toml \[cuda\]: unknown key 'warp'",
        '[cpu.decode]\nbackend = "jit"\n': r"\[cpu\] \[decode\]: backend = 'jit'",
        "[cpu]\n[cpu.cuda]\ncheck_every = 2\n": "cannot hold another",
    }.items():
        path.write_text(text)
        with pytest.raises(gsopt.GsoptError, match=message):
            load_recipe(path)


def test_cpu_decode_step_reads_weights_through_reductions():
    """MKL's sgemv reads fp32 weights at about half the memory's rate here: a compiled CPU
    decode step must not call it (extern mm/addmm) for its weight products."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    model = tiny()
    stages = apply(model, load_recipe("compile-decoder"))
    record: dict[str, tuple] = {}
    Pipeline(model, Stages.eager(model))(waves(), TEMPLATE, 3, record=record)
    with torch.no_grad():
        _, codes = run_and_get_code(stages.decode, *record["decode"])
    code = "\n".join(codes)
    assert "def call" in code
    assert not re.search(r"extern_kernels\.(mm|addmm|bmm)\(", code)
    plain = torch.compile(Stages.eager(model).decode)  # MKL's products, for contrast
    torch._dynamo.reset()
    with torch.no_grad():
        _, codes = run_and_get_code(plain, *record["decode"])
    assert re.search(r"extern_kernels\.(mm|addmm)\(", "\n".join(codes))


def test_onednn_linears_on_cpu_keep_tokens_and_one_decode_graph(eager_tokens):
    """best's [cpu] table packs every plain linear for oneDNN: the live LoRA's linears stay
    as they are, the tokens stay eager's, and the compiled decode step stays one graph."""
    from gsopt.engine.cpu_linear import OneDNNLinear

    torch._dynamo.reset()
    model = tiny()
    stages = apply(model, float32_form(load_recipe("best")))
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear | OneDNNLinear)]
    assert linears and all(isinstance(m, OneDNNLinear) for m in linears)
    assert isinstance(model.decoder.head, OneDNNLinear)
    assert torch.equal(Pipeline(model, stages)(waves(), TEMPLATE, 24), eager_tokens)
    assert stages.decode.graphs == 1 and stages.decode.graph_breaks == 0
    assert "decode" in stages.report.changed and "encoder" in stages.report.changed


CORRUPT_CACHE = """
import torch
from gsopt.recipe.compile import CompiledStage
from gsopt.recipe.settings import StageRecipe
step = CompiledStage(lambda x: (x * 2).sin() + 1)
print(float(step(torch.ones(8)).sum()))
"""


def test_a_corrupt_compile_cache_is_named_and_compiled_around(tmp_path):
    """A killed run can leave broken files in inductor's cache; the next run says so in one
    line and compiles again in a fresh private cache."""
    import subprocess
    import sys

    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    run = [sys.executable, "-c", CORRUPT_CACHE]
    first = subprocess.run(run, capture_output=True, text=True, env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    built = list((tmp_path / "cache").rglob("*.so"))
    assert built
    for path in built:
        path.write_bytes(b"not a shared object")
    again = subprocess.run(run, capture_output=True, text=True, env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout == first.stdout
    assert f"the compile cache at {tmp_path / 'cache'} looks corrupt" in again.stderr


def test_many_compiled_pipelines_in_one_process_each_compile_their_own_graphs():
    """Dynamo limits the graphs kept per function (8), and every pipeline compiles the same
    step functions for its own model: bench's sixth or seventh interleaved recipe used to fail
    its fullgraph compile. Ten stages over one function, each called on a module that needs
    its own graph (as a model of another dtype or quantization does)."""
    from gsopt.recipe.compile import CompiledStage

    class Scaled(torch.nn.Module):
        def __init__(self, power: int):
            super().__init__()
            self.power = power  # a Python constant: each value is a graph of its own

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x**self.power

    def step(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return module(x).relu()

    torch._dynamo.reset()
    x = torch.randn(2, 4)
    modules = [Scaled(power) for power in range(10)]
    stages = [CompiledStage(step, fullgraph=True) for _ in modules]
    for stage, module in zip(stages, modules, strict=True):
        torch.testing.assert_close(stage(module, x), module(x).relu())
    assert sum(s.graphs for s in stages) == len(modules)
