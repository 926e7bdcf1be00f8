"""`gsopt explain` on tiny: gsopt's stages compile without graph breaks and within the stated
graph bound; transformers' full forward is seen to break (so the check can fail)."""

from __future__ import annotations

import argparse
import json

import pytest

from gsopt import explain
from gsopt.apply import prompt_template
from gsopt.checkpoint import load_model
from gsopt.errors import GsoptError
from gsopt.explain import (
    MAX_NEW_TOKENS,
    explain_gsopt,
    explain_reference,
)
from gsopt.kv_cache import bucket
from gsopt.pipeline import STAGES, bucket_seconds

SECONDS = [1.0, 3.0, 5.0]  # 1 and 3 s share the 4 s bucket, 5 s takes the 8 s one


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


def test_dynamic_shapes_bound(reports, model):
    """dynamic=True: the audio stages compile once over the sweep; prefill and decode once
    per KV-cache length (dynamo specialises the cache's length), and only on that guard."""
    prompt = len(prompt_template(model.config)) - 1
    cache_lengths = {
        bucket(prompt + model.config.audio_tokens(int(s * 16000)) + MAX_NEW_TOKENS, 64)
        for s in SECONDS
    }
    for stage in STAGES:
        r = reports[(stage, "dynamic")]
        if stage in ("prefill", "decode"):
            assert r.sweep_graphs <= len(cache_lengths), (stage, r.recompile_reasons)
            assert all("'cache[0][0]' size mismatch" in m for m in r.recompile_reasons)
        else:
            assert r.sweep_graphs == 1 and r.recompiles == 0, (stage, r.recompile_reasons)


def test_buckets_compile_once_per_bucket(reports):
    """Static shapes with padding: at most one graph per audio bucket the sweep touches,
    and every recompile is a size guard (no grad-mode or type guard churn)."""
    touched = len({bucket_seconds(s) for s in SECONDS})
    for stage in STAGES:
        r = reports[(stage, "buckets")]
        assert r.sweep_graphs <= touched, (stage, r.recompile_reasons)
        assert all("size mismatch" in m for m in r.recompile_reasons), r.recompile_reasons


def test_bucket_seconds_ladder():
    assert [bucket_seconds(s) for s in (0.5, 4, 4.1, 60, 65, 200)] == [4, 4, 8, 64, 128, 256]


def test_transformers_forward_breaks(model):
    """One length keeps this cheap: the break (boolean-mask indexing before masked_scatter)
    shows at any length."""
    (r,) = explain_reference(model, [1.0], [1], backend="eager")
    assert r.graph_breaks > 0
    assert any("modeling_granite_speech.py" in b["where"] for b in r.break_reasons)


def test_command_writes_table_and_json(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    explain.add_parser(parser.add_subparsers())
    out = tmp_path / "e.json"
    args = parser.parse_args(
        ["explain", "--audio-seconds", "1", "--batch", "1", "--backend", "eager"]
        + ["--strategy", "dynamic", "--no-reference", "--json", str(out)]
    )
    assert args.run(args) == 0
    data = json.loads(out.read_text())
    assert [s["stage"] for s in data["stages"]] == list(STAGES)
    assert {"graphs", "graph_breaks", "recompiles", "recompile_reasons", "compile_s"} <= set(
        data["stages"][0]
    )
    assert "recompiles" in capsys.readouterr().out


def test_bad_strategy_is_a_user_error():
    parser = argparse.ArgumentParser()
    explain.add_parser(parser.add_subparsers())
    args = parser.parse_args(["explain", "--strategy", "nope"])
    with pytest.raises(GsoptError, match="unknown strategy"):
        args.run(args)
