"""Corpus runs (`transcribe --manifest`), torchrun data parallelism and `gsopt eval` (CPU).

The corpus runs use test_transcribe's tiny checkpoint whose text depends on the audio, so a
result filed under the wrong id shows; processes are real (a subprocess interrupted with
SIGINT, torchrun with two gloo ranks), and so are the files and jiwer.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jiwer
import numpy as np
import pytest
import soundfile
from helpers import save_checkpoint
from test_transcribe import audible_reference, speechlike, word_level_tokenizer

from gsopt import cli
from gsopt.commands.evaluate import agreement, score, spelling_mapping
from gsopt.model.checkpoint import load_model
from gsopt.model.parallel import Layout
from gsopt.transcription import corpus
from gsopt.transcription.transcriber import transcribe

MAX_NEW_TOKENS = 16
# (id, seconds, rate): distinct lengths, out of order, at several rates
GOOD = [
    (f"utt{i:02d}", seconds, rate)
    for i, (seconds, rate) in enumerate(
        zip(
            [0.9, 0.3, 1.5, 0.55, 1.2, 0.7, 1.35, 0.4, 1.05, 0.8, 0.45, 1.25],
            [16000, 8000, 44100, 16000, 22050, 16000, 48000, 16000, 16000, 8000, 16000, 16000],
            strict=True,
        )
    )
]
BAD = {  # id -> what its error says
    "bad-missing": r"nowhere\.wav: no such audio file",
    "bad-corrupt": r"notes\.wav: not a readable audio file",
    "bad-empty": r"empty\.wav: the audio clip is empty",
    "bad-long": r"long\.wav: 14460 s of audio is longer than --max-audio-seconds 14400",
}
TIMING = "timing"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = save_checkpoint(audible_reference(seed=11), tmp_path_factory.mktemp("ckpt"))
    word_level_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """Good clips with references among four bad files; paths relative to the manifest."""
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "clips").mkdir()
    rows = []
    for seed, (key, seconds, rate) in enumerate(GOOD):
        soundfile.write(
            folder / "clips" / f"{key}.wav", speechlike(round(seconds * rate), rate, seed), rate
        )
        rows.append({"audio": f"clips/{key}.wav", "text": f"reference {seed}", "id": key})
    (folder / "notes.wav").write_text("these are not samples\n")
    soundfile.write(folder / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
    # past the 4-hour cap (refused from its header), at the lowest rate a header may claim
    soundfile.write(folder / "long.wav", np.zeros(1000 * 14460, dtype=np.int16), 1000)
    bad_files = ["nowhere.wav", "notes.wav", "empty.wav", str(folder / "long.wav")]
    for i, (key, name) in enumerate(zip(BAD, bad_files, strict=True)):
        rows.insert(3 * i + 1, {"audio": name, "text": "x", "id": key})
    path = folder / "manifest.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def transcribe_args(manifest: Path, out: Path, model_dir: Path, *extra) -> list[str]:
    return [
        "transcribe",
        "--manifest",
        str(manifest),
        "--out",
        str(out),
        "--model",
        str(model_dir),
        "--max-new-tokens",
        str(MAX_NEW_TOKENS),
        "--quiet",
        *map(str, extra),
    ]


def run_main(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, err.getvalue()


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != TIMING} for row in rows]


@pytest.fixture(scope="module")
def reference(manifest, model_dir, tmp_path_factory) -> tuple[int, str, Path]:
    """One uninterrupted single-process run: (exit code, stderr, --out)."""
    out = tmp_path_factory.mktemp("reference") / "out.jsonl"
    code, err = run_main(transcribe_args(manifest, out, model_dir, "--batch-size", 4))
    return code, err, out


def test_bad_files_become_error_lines_and_the_good_ones_are_transcribed(
    reference, manifest, model_dir
):
    code, err, out = reference
    assert code == 1
    assert f"12 of 16 inputs transcribed, 4 failed (their lines in {out} carry 'error')" in err
    rows = records(out)
    expected_ids = [json.loads(line)["id"] for line in manifest.read_text().splitlines()]
    assert [row["id"] for row in rows] == expected_ids  # manifest order, each once
    by_id = {row["id"]: row for row in rows}
    for key, pattern in BAD.items():
        assert re.search(pattern, by_id[key]["error"]), by_id[key]
        assert by_id[key]["text"] is None and by_id[key]["timing"] is None
    # Each good line holds its own clip's result: the same as transcribing the files alone.
    paths = [manifest.parent / "clips" / f"{key}.wav" for key, _, _ in GOOD]
    alone = transcribe(paths, model=model_dir, max_new_tokens=MAX_NEW_TOKENS)
    for seed, ((key, seconds, _), result) in enumerate(zip(GOOD, alone, strict=True)):
        row = by_id[key]
        assert "error" not in row
        assert (row["text"], row["tokens"]) == (result.text, result.tokens)
        assert row["duration_s"] == pytest.approx(seconds, abs=1e-3)
        assert row["audio"] == str(result.path) and row["reference"] == f"reference {seed}"
    assert len({by_id[key]["text"] for key, _, _ in GOOD}) >= 10, "texts must tell clips apart"
    # Batches are runs of the duration-sorted list, at most --batch-size 4 each.
    ordered = sorted((key for key, _, _ in GOOD), key=lambda k: -by_id[k]["duration_s"])
    batches = [by_id[key]["timing"]["batch"] for key in ordered]
    assert batches == sorted(batches) and max(batches.count(b) for b in batches) <= 4


def test_rerun_skips_every_id_already_written(reference, manifest, model_dir, tmp_path):
    _, _, done = reference
    out = tmp_path / "out.jsonl"
    shutil.copy(done, out)
    code, err = run_main(transcribe_args(manifest, out, model_dir))
    assert code == 1 and "nothing left to transcribe" in err
    assert out.read_bytes() == done.read_bytes()


@pytest.mark.parametrize("tear", ["no newline", "not json"])
def test_a_torn_last_line_is_dropped_and_redone(
    reference, manifest, model_dir, tmp_path, caplog, tear
):
    _, _, done = reference
    lines = done.read_text().splitlines(keepends=True)
    torn = lines[6][: len(lines[6]) // 2] + ("" if tear == "no newline" else "\n")
    out = tmp_path / "out.jsonl"
    out.write_text("".join(lines[:6]) + torn)
    code, _ = run_main(transcribe_args(manifest, out, model_dir))
    assert code == 1 and "dropped a torn last line" in caplog.text
    assert untimed(records(out)) == untimed(records(done))


def test_sigint_after_the_first_batch_then_rerun_loses_and_repeats_nothing(
    reference, manifest, model_dir, tmp_path
):
    out = tmp_path / "out.jsonl"
    argv = transcribe_args(manifest, out, model_dir, "--batch-size", 1)
    child = subprocess.Popen(
        [sys.executable, "-m", "gsopt", *argv], stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 60
    while not (out.exists() and '"timing": {' in out.read_text()):  # a batch has ended
        assert child.poll() is None and time.monotonic() < deadline, child.stderr.read()
        time.sleep(0.01)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 130 and "interrupted" in err
    partial = records(out)  # whole lines only
    assert 5 <= len(partial) < 16, "interrupted after the error lines and a batch, before the end"
    code, _ = run_main(transcribe_args(manifest, out, model_dir, "--batch-size", 1))
    assert code == 1
    assert untimed(records(out)) == untimed(records(reference[2]))


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run(
        [*command, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=240
    )


def test_torchrun_two_gloo_ranks_equal_one_process(reference, manifest, model_dir, tmp_path):
    out = tmp_path / "out.jsonl"
    argv = transcribe_args(manifest, out, model_dir, "--batch-size", 4)
    run = torchrun("-m", "gsopt", *argv, cwd=tmp_path)
    assert run.returncode != 0, "an input failed, so the job fails"
    assert "12 of 16 inputs transcribed, 4 failed" in run.stderr
    assert "using tensor parallel" not in run.stdout + run.stderr
    rows = records(out)
    assert untimed(rows) == untimed(records(reference[2]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"], "parts merged, removed"
    # Dealt round-robin down the duration-sorted list: neighbours in length go to different ranks.
    good = sorted((r for r in rows if r[TIMING]), key=lambda r: -r["duration_s"])
    ranks = [r[TIMING]["rank"] for r in good]
    assert ranks.count(0) == ranks.count(1) == 6
    assert all(a != b for a, b in zip(ranks, ranks[1:], strict=False))


REPLICA = """
import json, sys
import torch.distributed as dist
from gsopt.model.parallel import join
from gsopt.transcription.transcriber import Transcriber

layout = join(1)
transcriber = Transcriber("tiny", device="cpu", max_new_tokens=4, layout=layout)
transcriber.load()
assert dist.is_initialized() and dist.get_world_size() == 2
shapes = {k: list(v.shape) for k, v in transcriber.pipeline.model.state_dict().items()}
open(f"{sys.argv[1]}/rank{layout.rank}.json", "w").write(json.dumps(shapes))
layout.leave()
"""


def test_each_rank_loads_the_whole_model_not_a_tensor_parallel_shard(tmp_path):
    """FMS's get_model shards a model tensor parallel when it finds a process group of
    world size > 1; a data-parallel rank must get the whole model, as one process does."""
    script = tmp_path / "replica.py"
    script.write_text(REPLICA)
    run = torchrun(str(script), str(tmp_path), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "using tensor parallel" not in run.stdout + run.stderr
    whole = {k: list(v.shape) for k, v in load_model("tiny").state_dict().items()}
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == whole


def one_line_error(argv: list[str]) -> str:
    code, err = run_main(argv)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, (code, err)
    return err


@pytest.mark.parametrize(
    "name,text,pattern",
    [
        ("m.jsonl", '{"audio": "a.wav"}\n\n{"audio": "b.wav"\n', r"m\.jsonl:3: not valid JSON"),
        ("m.jsonl", '{"audio": "a.wav"}\n{"text": "hi"}\n', r"m\.jsonl:2: no 'audio' field"),
        ("m.jsonl", '["a.wav"]\n', r"m\.jsonl:1: a JSON list, expected an object"),
        (
            "m.jsonl",
            '{"audio": "a.wav", "id": 1}\n{"audio": "b.wav", "id": 1}\n',
            r"m\.jsonl:2: id '1' repeats .*m\.jsonl:1",
        ),
        ("m.csv", "path,text\na.wav,hi\n", r"m\.csv:1: the header has no 'audio' column"),
        ("m.csv", "audio,text\na.wav,hi\n,no audio\n", r"m\.csv:3: no 'audio' field"),
    ],
)
def test_a_malformed_manifest_line_is_one_line_naming_it_before_any_model(
    tmp_path, name, text, pattern
):
    path = tmp_path / name
    path.write_text(text)
    # A model that does not exist: reading the manifest must fail first.
    argv = ["transcribe", "--manifest", str(path), "--out", str(tmp_path / "o.jsonl")]
    err = one_line_error([*argv, "--model", str(tmp_path / "no-model")])
    assert re.search(pattern, err), err


def test_option_and_output_file_mistakes_are_one_line(manifest, model_dir, tmp_path):
    base = ["transcribe", "--manifest", str(manifest), "--model", str(model_dir)]
    assert "needs --out" in one_line_error(base)
    assert "not both" in one_line_error([*base, "x.wav", "--out", str(tmp_path / "o.jsonl")])
    assert "--out applies to --manifest" in one_line_error(["transcribe", "--out", "o.jsonl"])
    out = tmp_path / "o.jsonl"
    assert "--batch-seconds must be above 0" in one_line_error(
        [*base, "--out", str(out), "--batch-seconds", "0"]
    )
    for text in ("hello\n", '{"id": "utt00"}\nhello'):  # left alone: not torn gsopt lines
        out.write_text(text)
        assert "not a gsopt result line" in one_line_error([*base, "--out", str(out)])
        assert out.read_text() == text
    out.write_text('{"id": "elsewhere", "text": "?"}\n')
    assert "ids not in the manifest (e.g. 'elsewhere')" in one_line_error(
        [*base, "--out", str(out)]
    )


def test_csv_and_folder_manifests(reference, manifest, model_dir, tmp_path):
    """A CSV with the same columns gives the JSONL's lines; a folder gives every audio file
    in it, recursively, with its relative path as the id."""
    rows = [json.loads(line) for line in manifest.read_text().splitlines()][:5]
    csv_path = manifest.parent / "subset.csv"
    csv_path.write_text(
        "id,audio,text\n" + "".join(f'{r["id"]},{r["audio"]},"{r["text"]}"\n' for r in rows)
    )
    out = tmp_path / "csv.jsonl"
    assert run_main(transcribe_args(csv_path, out, model_dir))[0] == 1  # two bad files
    by_id = {r["id"]: r for r in untimed(records(reference[2]))}
    assert untimed(records(out)) == [by_id[r["id"]] for r in rows]

    folder = tmp_path / "folder"
    (folder / "b").mkdir(parents=True)
    for name in ("b/two.wav", "one.flac"):
        soundfile.write(folder / name, speechlike(8000, 16000, 1), 16000)
    (folder / "b" / "notes.txt").write_text("not audio, not listed")
    out = tmp_path / "folder.jsonl"
    assert run_main(transcribe_args(folder, out, model_dir))[0] == 0
    assert [r["id"] for r in records(out)] == ["b/two.wav", "one.flac"]


def test_batches_keep_to_both_budgets_and_ranks_get_the_same_mix():
    entries = [corpus.Entry(i, str(i), Path(f"{i}.wav"), None, "") for i in range(7)]
    items = list(zip(entries, [10.0, 9.0, 8.0, 3.0, 3.0, 3.0, 1.0], strict=True))
    sizes = [[s for _, s in batch] for batch in corpus.plan_batches(items, 3, 20.0)]
    # 10+9 fit 2 x 10 = 20 s padded; 8 alone would pass 3 x 10; three 3 s clips are the cap.
    assert sizes == [[10.0, 9.0], [8.0, 3.0], [3.0, 3.0, 1.0]]
    assert [[s for _, s in b] for b in corpus.plan_batches(items[:2], 8, 5.0)] == [[10.0], [9.0]]
    dealt = [corpus.deal(items, Layout(r, 2)) for r in (0, 1)]
    assert [[s for _, s in share] for share in dealt] == [[10.0, 8.0, 3.0, 1.0], [9.0, 3.0, 3.0]]


# --- gsopt eval ------------------------------------------------------------------------------


def test_wer_and_cer_of_known_pairs_after_whisper_normalisation():
    references = ["Mr. Smith's colour is grey.", "I've got 2 apples, haven't I?", "Hmm."]
    hypotheses = ["mister smith is color is gray", "i have got two apple", "uh"]
    # Whisper's normaliser by hand: titles spelled out, 's as "is", British spellings made
    # American, contractions expanded, numbers as digits, fillers ("hmm") dropped.
    refs = ["mister smith is color is gray", "i have got 2 apples have not i"]
    hyps = ["mister smith is color is gray", "i have got 2 apple"]
    assert spelling_mapping()[0]["colour"] == "color"
    figures = score(references, hypotheses)
    # one substitution (apples) and three deletions over 14 reference words; "hmm" has none
    assert figures["wer"] == pytest.approx(4 / 14) == pytest.approx(jiwer.wer(refs, hyps))
    assert figures["cer"] == pytest.approx(jiwer.cer(refs, hyps))
    assert (figures["substitutions"], figures["deletions"], figures["insertions"]) == (1, 3, 0)
    assert (figures["scored"], figures["empty_references"]) == (2, 1)
    assert agreement([[1, 2, 3], [4]], [[1, 9, 3, 5], [4]]) == {
        "token_agreement": 3 / 5,
        "identical": 0.5,
    }


def test_eval_on_the_tiny_variant(manifest, tmp_path):
    """Plumbing only: the tiny variant's random weights make its WER meaningless."""
    rows = [json.loads(line) for line in manifest.read_text().splitlines()][:6]  # two bad
    subset = manifest.parent / "eval.jsonl"
    subset.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "eval"
    argv = ["eval", "--manifest", str(subset), "--recipes", "static-kv", "--model", "tiny"]
    argv += ["--max-new-tokens", "4", "--out", str(out), "--quiet"]
    code, err = run_main(argv)
    assert code == 1 and "some inputs failed (eager: 2, static-kv: 2)" in err

    def refuse(constant: str):
        raise ValueError(f"non-strict JSON constant {constant}")

    report = json.loads((out / "eval.json").read_text(), parse_constant=refuse)
    assert [r["recipe"] for r in report["recipes"]] == ["eager", "static-kv"]
    assert (report["inputs"], report["scored_inputs"]) == (6, 4)
    good = [r for r in rows if not r["id"].startswith("bad")]
    for row in report["recipes"]:
        transcripts = {r["id"]: r for r in records(Path(row["transcripts"]))}
        texts = [transcripts[r["id"]]["text"] for r in good]
        assert row["wer"] == score([r["text"] for r in good], texts)["wer"]
        assert row["failed"] == 2 and row["rtfx"] > 0
    eager, static = report["recipes"]
    assert eager["wer_change"] == 0 and eager["token_agreement"] == 1
    assert static["identical"] == 1, "static-kv is lossless: the same tokens as eager"
    table = (out / "eval.md").read_text()
    assert "| recipe" in table and "random weights" in table


def test_eval_needs_a_reference_for_every_input(manifest, tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"audio": "a.wav", "text": "hi"}\n{"audio": "b.wav"}\n')
    err = one_line_error(["eval", "--manifest", str(path), "--out", str(tmp_path / "e")])
    assert "m.jsonl:2: no 'text' (the reference)" in err


def test_resuming_under_other_settings_is_refused_naming_what_differs(manifest, tmp_path):
    """Every line carries the settings it was made with; a rerun under others would mix two
    models' (or budgets') texts in one file."""
    out = tmp_path / "o.jsonl"
    base = ["transcribe", "--manifest", str(manifest), "--out", str(out), "--quiet"]
    assert run_main([*base, "--model", "tiny", "--max-new-tokens", "2"])[0] == 1  # bad inputs
    before = out.read_text()
    for argv, differs in (
        (["--model", "cpu-small", "--max-new-tokens", "2"], "written with model 'tiny'"),
        (["--model", "tiny", "--max-new-tokens", "3"], "written with max_new_tokens 2"),
        (["--model", "tiny", "--max-new-tokens", "2", "--recipe", "eager"], "recipe"),
    ):
        err = one_line_error([*base, *argv])
        assert differs in err and "--resume-anyway" in err
        assert out.read_text() == before
    code, err = run_main([*base, "--model", "tiny", "--max-new-tokens", "3", "--resume-anyway"])
    assert code == 1 and "nothing left to transcribe" in err


def test_outputs_that_are_inputs_devices_or_fifos_are_refused(manifest, tmp_path):
    base = ["transcribe", "--manifest", str(manifest), "--model", "tiny"]
    assert "is one of the inputs" in one_line_error([*base, "--out", str(manifest)])
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert "not a regular file" in one_line_error([*base, "--out", str(fifo)])
    for device in ("/dev/full", "/dev/null", "/proc/self/status"):
        assert "is a system path" in one_line_error([*base, "--out", device])
    ids = tmp_path / "ids.jsonl"  # a JSONL of ids, not gsopt's results: left alone
    ids.write_text(manifest.read_text())
    assert "names no run settings" in one_line_error([*base, "--out", str(ids)])
    assert ids.read_text() == manifest.read_text()


def test_a_symlinked_out_is_written_through_to_its_target(manifest, tmp_path):
    target, link = tmp_path / "target.jsonl", tmp_path / "link.jsonl"
    link.symlink_to(target)
    argv = ["transcribe", "--manifest", str(manifest), "--model", "tiny", "--out", str(link)]
    assert run_main([*argv, "--max-new-tokens", "2", "--quiet"])[0] == 1
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert len(target.read_text().splitlines()) == 16
