"""Every class of bad input gets one line on stderr and exit code 2, before expensive work:
audio files, checkpoint configs, budgets, command options and output paths."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import soundfile

from gsopt.cli import main


def one_line_error(capsys, *argv: str) -> str:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 2, (code, out, err)
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def wav(tmp_path):
    def write(name: str, data, rate: int = 16000):
        path = tmp_path / name
        soundfile.write(path, np.asarray(data, dtype=np.float32), rate, subtype="FLOAT")
        return str(path)

    return write


def test_a_clip_shorter_than_one_frame_is_refused_alone_and_in_a_batch(capsys, wav):
    short = wav("short.wav", np.zeros(100))
    good = wav("good.wav", 0.1 * np.random.default_rng(0).standard_normal(16000))
    alone = one_line_error(capsys, "transcribe", short)
    batched = one_line_error(capsys, "transcribe", good, short, "--batch-size", "2")
    assert "shorter than one encoder frame" in alone and alone == batched


def test_nan_or_inf_samples_are_refused(capsys, wav):
    data = np.zeros(16000)
    data[100] = np.nan
    assert "NaN or infinite" in one_line_error(capsys, "transcribe", wav("nan.wav", data))
    data[100] = np.inf
    assert "NaN or infinite" in one_line_error(capsys, "transcribe", wav("inf.wav", data))


def test_a_folder_given_as_audio_says_so(capsys, tmp_path):
    assert "is a folder" in one_line_error(capsys, "transcribe", str(tmp_path))


def test_budgets_name_what_ran_out(capsys, wav):
    clip = wav("long.wav", np.zeros(16000 * 20), rate=8000)  # 40 s at 8 kHz
    err = one_line_error(capsys, "transcribe", clip, "--max-new-tokens", "100000")
    assert "leave no room for audio" in err and "--max-new-tokens" in err
    err = one_line_error(capsys, "transcribe", clip, "--max-new-tokens", "7900")
    assert "--chunk-length 30: 30.0 s of audio is longer than this model allows" in err
    assert "lower --chunk-length or --max-new-tokens" in err


@pytest.mark.parametrize(
    "config, message",
    [
        ("[1, 2]", "holds a JSON list, expected an object"),
        (
            '{"model_type": "granite_speech", "encoder_config": 5, "projector_config": {}, '
            '"text_config": {}}',
            "encoder_config is int 5, expected an object",
        ),
        (None, "is a folder; expected a JSON file"),
    ],
)
def test_a_config_json_of_the_wrong_shape_names_the_field(capsys, tmp_path, config, message):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    if config is None:
        (folder / "config.json").mkdir()
    else:
        (folder / "config.json").write_text(config)
    assert message in one_line_error(capsys, "transcribe", "--model", str(folder))


def test_command_options_out_of_range(capsys, tmp_path):
    report = tmp_path / "file.txt"
    report.write_text("x")
    cases = [
        (["apply", "--recipe", "eager", "--model", "tiny", "--repeats", "0"], "--repeats"),
        (["apply", "--recipe", "eager", "--model", "tiny", "--out", str(report)], "not a folder"),
        (["bench", "--model", "tiny", "--batch-size", "0"], "--batch-size"),
        (["bench", "--model", "tiny", "--batch-size", "x"], "comma-separated numbers"),
        (["bench", "--model", "tiny", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["bench", "--model", "tiny", "--audio-seconds", "0"], "--audio-seconds"),
        (["bench", "--model", "tiny", "--audio-seconds", "5000"], "decoder positions"),
        (["bench", "--model", "tiny", "--out", str(tmp_path)], "is a folder"),
    ]
    for argv, message in cases:
        assert message in one_line_error(capsys, *argv), argv
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    assert "not a gsopt bench result" in one_line_error(capsys, "report", str(empty))


def test_reports_are_strict_json_with_the_umask_permissions(capsys, tmp_path):
    out = tmp_path / "r"
    argv = ["apply", "--recipe", "static-kv", "--model", "tiny", "--max-new-tokens", "1"]
    assert main([*argv, "--repeats", "1", "--out", str(out)]) == 0

    def refuse(constant: str):
        raise ValueError(f"non-strict JSON constant {constant}")

    json.loads((out / "report.json").read_text(), parse_constant=refuse)
    umask = os.umask(0)
    os.umask(umask)
    for name in ("report.json", "report.md"):
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~umask


def test_version_and_help(capsys):
    assert main(["--version"]) == 0 and capsys.readouterr().out.startswith("gsopt ")
    assert main(["bench", "--help"]) == 0
    text = capsys.readouterr().out
    assert "(default: 10)" in text and "transformers" in text and "--batch-size" in text


@pytest.mark.parametrize("launcher", ["module", "script"])
def test_ctrl_c_while_loading_prints_one_line(launcher):
    """SIGINT lands while torch is still importing (it takes over a second): one line, 130."""
    import shutil
    import signal
    import subprocess
    import sys
    import time

    if launcher == "module":
        command = [sys.executable, "-m", "gsopt", "--version"]
    else:
        script = shutil.which("gsopt", path=os.path.dirname(sys.executable))
        if script is None:
            pytest.skip("the gsopt console script is not installed in this environment")
        command = [script, "--version"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.4)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    if process.returncode == 0:
        pytest.skip("the process finished loading before the signal arrived")
    # 130, or killed by SIGINT itself (-2), which a shell also reports as 130.
    assert process.returncode in (130, -2) and err == "gsopt: interrupted\n", err


def test_wrongly_typed_and_binary_settings_name_the_field(capsys, tmp_path):
    """config.json fields of the wrong type, recipe values of the wrong type, a recipe that
    is not text, a folder given as a results file."""
    from helpers import hf_config, reference_model, save_checkpoint

    folder = save_checkpoint(reference_model(hf_config()), tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["hidden_size"] = "big"
    (folder / "config.json").write_text(json.dumps(config))
    err = one_line_error(capsys, "transcribe", "--model", str(folder))
    assert "text_config.hidden_size is str 'big', expected an integer" in err
    recipe = tmp_path / "r.toml"
    recipe.write_text('kv_cache = "static"\n[quantize]\nweights = "int4"\ngroup_size = 7\n')
    err = one_line_error(capsys, "apply", "--recipe", str(recipe), "--model", "tiny")
    assert "group_size = 7 is not one of 32, 64, 128" in err
    recipe.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    assert "not UTF-8 text" in one_line_error(capsys, "apply", "--recipe", str(recipe))
    recipe.write_text('kv_cache = "static"\n[speculate]\nk = 1000\n')
    assert "k = 1000 must be at most 64" in one_line_error(capsys, "apply", "--recipe", str(recipe))
    assert "is a folder; expected a JSON file" in one_line_error(capsys, "report", str(tmp_path))


def test_a_header_below_any_speech_rate_is_refused(capsys, tmp_path):
    path = tmp_path / "one-hertz.wav"
    soundfile.write(path, np.zeros(10, dtype=np.float32), 1)
    assert "header says 1 Hz" in one_line_error(capsys, "transcribe", str(path), "--model", "tiny")


def test_a_url_in_a_manifest_is_refused_as_such(capsys, tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"audio": "https://example.com/a.wav"}\n')
    argv = ["transcribe", "--manifest", str(manifest), "--out", str(tmp_path / "o.jsonl")]
    err = one_line_error(capsys, *argv, "--model", "tiny")
    assert "'audio' is a URL (https://example.com/a.wav)" in err


def test_a_model_or_batch_too_large_for_memory_is_refused_before_loading(capsys):
    err = one_line_error(capsys, "bench", "--model", "tiny", "--batch-size", "1000000")
    assert "1000000 row(s) of KV cache" in err and "--no-memory-check" in err
    # Under a 4 GiB address-space limit (`ulimit -v`), as a small container would set.
    import resource
    import subprocess
    import sys

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    done = subprocess.run(
        [sys.executable, "-m", "gsopt", "transcribe", "--model", "3.3-2b", "--quiet"],
        capture_output=True,
        text=True,
        preexec_fn=limit,
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr[-2000:]
    # 3.3-2b has about 3.0B parameters (the model card): 11.2 GiB of float32, plus a cache
    need = float(re.search(r"3\.3-2b needs about (\d+\.\d) GiB in float32", done.stderr)[1])
    assert 11.0 < need < 13.0
    assert "address-space limit (ulimit -v) leaves" in done.stderr


def test_an_ignored_draft_model_is_a_warning(capsys):
    capsys.readouterr()
    assert main(["transcribe", "--model", "tiny", "--draft-model", "tiny", "--quiet"]) == 0
    assert "warning: --draft-model is ignored" in capsys.readouterr().err


def test_usage_mistakes_and_unusable_numbers_are_one_line(capsys):
    err = one_line_error(capsys, "apply", "--recipe", "eager", "--repeats", "abc")
    assert "invalid int value: 'abc' (see gsopt apply --help)" in err
    assert "arguments are required: command" in one_line_error(capsys)
    err = one_line_error(capsys, "bench", "--model", "tiny", "--audio-seconds", "nan")
    assert "every value must be a finite number" in err
    err = one_line_error(capsys, "explain", "--model", "tiny", "--audio-seconds", "0")
    assert "above 0" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["apply", "--recipe", "eager", "--model", "tiny"],
        ["bench", "--model", "tiny"],
        ["explain", "--model", "tiny"],
        ["eval", "--manifest", "MANIFEST", "--model", "tiny"],
    ],
)
def test_an_unwritable_output_is_refused_before_the_run(capsys, tmp_path, argv):
    """Found at the start, not after minutes of results: an --out under a regular file."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"audio": "x.wav", "text": "x"}\n')
    argv = [str(manifest) if a == "MANIFEST" else a for a in argv]
    err = one_line_error(capsys, *argv, "--out", str(blocker / "out"))
    assert "is not a writable folder" in err


def test_report_output_is_checked_before_reading_writing(capsys, tmp_path):
    results = os.path.join(os.path.dirname(__file__), "..", "bench", "results")
    recorded = os.path.join(results, "cpu-tiny-3s-n32.json")
    err = one_line_error(capsys, "report", recorded, "--out", recorded)
    assert "exists and is not a folder" in err


def test_a_compiling_recipe_says_so_and_library_noise_is_silenced(capsys):
    capsys.readouterr()
    argv = ["transcribe", "--model", "tiny", "--recipe", "int8-decoder", "--max-new-tokens", "2"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "compiling int8-decoder's stages" in err
    assert "Failed to load" not in err and "Enum subclass" not in err
