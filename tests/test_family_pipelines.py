"""The current model family through the commands: `gsopt transcribe` on a saved tiny
checkpoint of each type (4.1 with its BPE head, 4.1 Plus, 5.0 CTC), batched as alone, and
`gsopt apply` on the 5.0 CTC model, whose report has no decoder stages."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile
from family_helpers import reference_ctc_model, reference_plus_model, save_out_llm
from helpers import hf_config, reference_model, save_checkpoint
from test_transcribe import word_level_tokenizer

from gsopt.cli import main, parser_for
from gsopt.model.config import CTC_VARIANTS
from gsopt.model.tokenizer import synthetic_ctc_tokenizer


@pytest.fixture(scope="module")
def wavs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("family-wavs")
    paths = []
    for seed, seconds in enumerate((1.3, 0.7, 2.1)):
        rng = np.random.default_rng(seed)
        path = folder / f"clip{seed}.wav"
        soundfile.write(path, 0.1 * rng.standard_normal(round(16000 * seconds)), 16000)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    g41 = save_checkpoint(reference_model(hf_config(), seed=3), root / "g41")
    save_out_llm(g41, 320, 32, seed=4)
    word_level_tokenizer().save_pretrained(g41)
    plus = root / "plus"
    reference_plus_model(seed=5).save_pretrained(plus)
    word_level_tokenizer().save_pretrained(plus)
    ctc = root / "ctc"
    reference_ctc_model(CTC_VARIANTS["tiny-ctc"], seed=6).save_pretrained(ctc)
    synthetic_ctc_tokenizer(CTC_VARIANTS["tiny-ctc"]).save_pretrained(ctc)
    return {"4.1": g41, "plus": plus, "5.0": ctc}


def transcripts(capsys, *argv: str) -> list[dict]:
    capsys.readouterr()
    assert main(["transcribe", *argv, "--json", "--quiet", "--max-new-tokens", "8"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("kind", ["4.1", "plus", "5.0"])
def test_transcribe_each_type_batched_as_alone(capsys, checkpoints, wavs, kind):
    folder = str(checkpoints[kind])
    batched = transcripts(capsys, *wavs, "--model", folder, "--batch-size", "3")
    alone = [transcripts(capsys, wav, "--model", folder)[0] for wav in wavs]
    assert [r["text"] for r in batched] == [r["text"] for r in alone]
    assert any(r["text"] for r in batched)
    if kind == "5.0":
        assert all(r["prompt_tokens"] == 0 for r in batched)
        assert set(batched[0]["batch"]["stages"]) == {"frontend", "encoder"}


def test_apply_on_the_ctc_model_reports_only_its_stages(capsys, tmp_path):
    out = tmp_path / "report"
    argv = ["apply", "--recipe", "compile-encoder", "--model", "tiny-ctc", "--repeats", "1"]
    assert main([*argv, "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [row["stage"] for row in report["stages"]] == ["frontend", "encoder"]
    assert report["tokens_identical"]
    assert any("no projector stage" in note for note in report["notes"])
    text = (out / "report.md").read_text()
    assert "| prefill" not in text and "no decoder" in text


def test_bench_times_the_ctc_model_beside_transformers(tmp_path):

    parser = parser_for(["bench"])
    out = tmp_path / "ctc.json"
    args = parser.parse_args(
        [
            "bench",
            "--model",
            "tiny-ctc",
            "--device",
            "cpu",
            "--recipes",
            "eager",
            "--audio-seconds",
            "1",
            "--repeats",
            "1",
            "--out",
            str(out),
        ]
    )
    assert args.run(args) == 0
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"transformers-eager", "eager"}
    assert all(r["error"] is None for r in rows.values())
    assert set(rows["eager"]["stages"]) == {"frontend", "encoder"}
    assert rows["eager"]["decode_ms_per_token"] is None and "roofline" not in rows["eager"]


def test_explain_sees_the_ctc_models_two_stages_without_breaks():
    import gsopt
    from gsopt.commands.explain import explain_gsopt

    model = gsopt.load_model("tiny-ctc")
    reports = explain_gsopt(model, [1.0, 2.0], [1], ["dynamic"], backend="eager")
    assert [r.stage for r in reports] == ["frontend", "encoder"]
    assert all(r.graphs == 1 and r.graph_breaks == 0 for r in reports)
