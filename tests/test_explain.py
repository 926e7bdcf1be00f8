"""`gsopt explain` on tiny: gsopt's stages compile without graph breaks and within the stated
graph bound; transformers' full forward is seen to break (so the check can fail)."""

from __future__ import annotations

import json

import pytest

from gsopt.cli import parser_for
from gsopt.commands.explain import explain_gsopt, explain_reference
from gsopt.engine.kv_cache import bucket
from gsopt.engine.pipeline import STAGES, block_seconds, bucket_seconds
from gsopt.errors import GsoptError
from gsopt.model.checkpoint import load_model
from gsopt.model.tokenizer import prompt_template

SECONDS = [1.0, 3.0, 5.0]


@pytest.fixture(scope="module")
def model():
    return load_model("tiny", lora="merged")


@pytest.fixture(scope="module")
def reports(model):
    return {
        (r.stage, r.strategy): r
        for r in explain_gsopt(model, SECONDS, [1], ["dynamic", "buckets"], backend="eager")
    }


def test_gsopt_stages_have_no_graph_breaks(reports):
    for (stage, strategy), r in reports.items():
        assert r.graph_breaks == 0 and r.break_reasons == [], (stage, strategy, r.break_reasons)
        assert r.graphs == 1, (stage, strategy)


def test_dynamic_shapes_bound(reports):
    """dynamic=True over 1, 3 and 5 s: every stage compiles once. The decode step no longer
    recompiles per cache length: one cache per batch size, the attended span dynamic."""
    for stage in STAGES:
        r = reports[(stage, "dynamic")]
        assert r.sweep_graphs == 1 and r.recompiles == 0, (stage, r.recompile_reasons)


def test_buckets_compile_once_per_bucket(reports, model):
    """Static shapes with padding: the audio stages compile once per attention-block count
    the sweep touches, the prefill once per (block count, 64-token prompt bucket), the
    decode step once; every recompile is a size guard."""
    block = block_seconds(model)
    blocks = {bucket_seconds(s, block) for s in SECONDS}
    prompt = len(prompt_template(model.config)) - 1
    pairs = {
        (bucket_seconds(s, block), bucket(prompt + model.config.audio_tokens(int(s * 16e3)), 64))
        for s in SECONDS
    }
    bound = dict.fromkeys(("frontend", "encoder", "projector"), len(blocks))
    bound.update(prefill=len(pairs), decode=1)
    assert reports[("encoder", "buckets")].recompile_reasons  # so the check below sees some
    for stage in STAGES:
        r = reports[(stage, "buckets")]
        assert r.sweep_graphs <= bound[stage], (stage, r.recompile_reasons)
        assert all("size mismatch" in m for m in r.recompile_reasons), r.recompile_reasons


def test_bucket_seconds_pads_to_whole_blocks(model):
    assert block_seconds(model) == 8 * 2 * 160 / 16000  # tiny: 8-frame blocks
    assert [bucket_seconds(s, 4.0) for s in (0.5, 4, 4.1, 10, 60.5)] == [4, 4, 8, 12, 64]


def test_transformers_forward_breaks(model):
    """One length keeps this cheap: the break (boolean-mask indexing before masked_scatter)
    shows at any length."""
    (r,) = explain_reference(model, [1.0], [1], backend="eager")
    assert r.graph_breaks > 0
    assert any("modeling_granite_speech.py" in b["where"] for b in r.break_reasons)


def test_command_writes_table_and_json(tmp_path, capsys):
    parser = parser_for(["explain"])
    out = tmp_path / "e.json"
    args = parser.parse_args(
        ["explain", "--model", "tiny", "--audio-seconds", "1", "--batch-size", "1"]
        + ["--backend", "eager"]
        + ["--strategy", "dynamic", "--no-reference", "--out", str(out)]
    )
    assert args.run(args) == 0
    data = json.loads(out.read_text())
    assert [s["stage"] for s in data["stages"]] == list(STAGES)
    assert {"graphs", "graph_breaks", "recompiles", "recompile_reasons", "compile_s"} <= set(
        data["stages"][0]
    )
    assert "recompiles" in capsys.readouterr().out


def test_bad_strategy_is_a_user_error():
    parser = parser_for(["explain"])
    args = parser.parse_args(["explain", "--model", "tiny", "--strategy", "nope"])
    with pytest.raises(GsoptError, match="unknown strategy"):
        args.run(args)
