"""FMS tensor parallelism on the CPU: 2 gloo ranks give TP=1's greedy tokens, eager and with
a compiled decode step; each rank holds half the heads; bad head counts are refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import AUDIO_TOKEN_ID, add_lora, reference_model, save_checkpoint

import gsopt
from gsopt.engine.generate import generate
from gsopt.model.tensor_parallel import check_shardable

WORKER = Path(__file__).parent / "workers" / "tp_generate.py"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    ref = reference_model(seed=11)
    lora = add_lora(ref)  # the merged LoRA must be sharded with its weight
    return save_checkpoint(ref, tmp_path_factory.mktemp("tp"), lora=lora)


def test_two_ranks_give_one_ranks_tokens(checkpoint, tmp_path):
    model = gsopt.load_model(checkpoint, lora="merged")
    torch.manual_seed(0)
    features = torch.randn(2, 37, 160)
    prompts = [torch.tensor([5, 6, *[AUDIO_TOKEN_ID] * 9, 7, 8])] * 2
    with torch.no_grad():
        expected = generate(model, prompts, model.embed_audio(features), 12, stop_at_eos=False)
    assert len(set(expected[0].tolist())) > 3
    out = tmp_path / "tp.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    run = subprocess.run(
        [*command, str(WORKER), str(checkpoint), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["eager"] == expected.tolist()
    assert result["compiled"] == expected.tolist()
    dec = model.config.decoder
    q, kv = dec.nheads * dec.head_dim, dec.kvheads * dec.head_dim
    assert result["qkv"] == [(q + 2 * kv) // 2, dec.emb_dim]  # each rank: half the heads
    assert result["cache_kv_heads"] == dec.kvheads // 2


def test_a_head_count_that_does_not_divide_is_refused():
    config = gsopt.get_variant("tiny")  # 4 heads, 2 kv heads
    check_shardable(config, 2)
    with pytest.raises(gsopt.GsoptError, match="2 kv heads do not divide by 4"):
        check_shardable(config, 4)
    with pytest.raises(gsopt.GsoptError, match="4 attention heads do not divide by 3"):
        check_shardable(config, 3)


def test_tp_without_torchrun_is_a_one_line_error(capsys, monkeypatch):
    from gsopt.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    code = main(["apply", "--recipe", "eager", "--model", "tiny", "--tp", "2"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "torchrun --nproc-per-node 2" in err


def test_transcribe_tp2_prints_what_one_process_prints(checkpoint, tmp_path):
    """The CLI end to end: torchrun, two shards, the same transcript as one process."""
    import numpy as np
    import soundfile
    from test_transcribe import word_level_tokenizer

    word_level_tokenizer().save_pretrained(checkpoint)
    wav = tmp_path / "clip.wav"
    soundfile.write(wav, 0.1 * np.random.default_rng(3).standard_normal(24000), 16000)
    argv = ["-m", "gsopt", "transcribe", str(wav), "--model", str(checkpoint)]
    argv += ["--max-new-tokens", "10", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    two = subprocess.run(
        [*launcher, *argv, "--tp", "2"], capture_output=True, text=True, env=env, timeout=600
    )
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert one.stdout.strip() and two.stdout == one.stdout


def test_tp2_manifest_run_of_a_variant_equals_one_process(tmp_path):
    """`--tp` with `--manifest`: one replica of two shards writes what one process writes.
    A variant's random weights under --tp are one process's weights, drawn whole and then
    sharded, so the text is the same too."""
    import numpy as np
    import soundfile

    rng = np.random.default_rng(5)
    lines = []
    for i in range(4):
        soundfile.write(tmp_path / f"c{i}.wav", 0.1 * rng.standard_normal(8000 + 5000 * i), 16000)
        lines.append(json.dumps({"audio": f"c{i}.wav", "id": f"c{i}"}) + "\n")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(lines))
    argv = ["-m", "gsopt", "transcribe", "--manifest", str(manifest), "--model", "tiny"]
    argv += ["--max-new-tokens", "8", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, *argv, "--out", str(tmp_path / "one.jsonl")],
        capture_output=True,
        text=True,
        env=env,
    )
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    two = subprocess.run(
        [*launcher, *argv, "--out", str(tmp_path / "two.jsonl"), "--tp", "2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert two.stderr.count("using tensor parallel") == 1
    outputs = [tmp_path / "one.jsonl", tmp_path / "two.jsonl"]
    tokens = [[(r["id"], r["tokens"]) for r in map(json.loads, path.open())] for path in outputs]
    assert len(tokens[0]) == 4 and all(t for _, t in tokens[0])
    assert tokens[0] == tokens[1]
