"""Long recordings: windows (fixed and VAD), batched windows equal to each window alone,
stitched results in the file's time, subtitle files through real parsers, Plus's tags, and
the refusals (duration caps, lying headers, bad chunking)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import soundfile
import srt
import webvtt
from test_transcribe import audible_reference, word_level_tokenizer

from gsopt.audio.files import Recording, sample_audio
from gsopt.audio.windows import windows
from gsopt.cli import main
from gsopt.transcription import writers
from gsopt.transcription.longform import (
    LongForm,
    _reconcile,
    parse_speakers,
    parse_word_timestamps,
)
from gsopt.transcription.prompts import Ask
from gsopt.transcription.transcriber import Transcriber

RATE = 16000
TOKENS = 6  # the command tests' budget; the windows' own is 200 per 30 s


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from helpers import save_checkpoint

    folder = save_checkpoint(audible_reference(seed=21), tmp_path_factory.mktemp("long-model"))
    word_level_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def transcriber(model_dir):
    t = Transcriber(model_dir, max_new_tokens=TOKENS)
    t.load()
    return t


def silence(seconds: float) -> np.ndarray:
    return np.zeros(round(seconds * RATE), dtype=np.float32)


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return sample_audio().numpy()


@pytest.fixture(scope="module")
def clips_file(tmp_path_factory, speech):
    """Three known pieces of speech, each between 1.5 s of silence: (path, their spans)."""
    pieces = [speech[: 3 * RATE], speech[3 * RATE : 6 * RATE], speech[RATE : 3 * RATE]]
    parts, spans, at = [silence(1.5)], [], 1.5
    for piece in pieces:
        parts += [piece, silence(1.5)]
        spans.append((at, at + len(piece) / RATE))
        at += len(piece) / RATE + 1.5
    path = tmp_path_factory.mktemp("long") / "three.wav"
    soundfile.write(path, np.concatenate(parts), RATE, subtype="FLOAT")
    return path, spans


def alone(transcriber, recording_path, start: float, end: float, tmp_path) -> str:
    """One window's audio written out as its own file and transcribed whole."""
    samples, _ = soundfile.read(recording_path, dtype="float32")
    piece = tmp_path / f"piece-{start:.3f}.wav"
    soundfile.write(piece, samples[round(start * RATE) : round(end * RATE)], RATE, subtype="FLOAT")
    return transcriber.transcribe(piece, LongForm(chunk_length=25.0))["text"]


def test_vad_segments_line_up_with_the_clips_and_equal_their_windows_alone(
    transcriber, clips_file, tmp_path
):
    path, spans = clips_file
    result = transcriber.transcribe(
        path, LongForm(segmentation="vad", chunk_length=10.0), batch_size=3
    )
    segments = result["segments"]
    assert len(segments) == len(spans)
    for segment, (start, end) in zip(segments, spans, strict=True):
        # Silero pads speech by 0.2 s and may trim a quiet edge of the clip
        assert start - 0.5 <= segment["start"] <= start + 0.5
        assert end - 0.5 <= segment["end"] <= end + 0.5
    texts = [s["text"] for s in segments]
    assert len(set(texts)) > 1  # the model hears the audio: a batching mistake would show
    for segment in segments:
        assert segment["text"] == alone(
            transcriber, path, segment["start"], segment["end"], tmp_path
        )
    assert result["text"] == " ".join(texts)
    assert [s["id"] for s in segments] == [0, 1, 2]


def test_fixed_windows_cover_the_file_and_each_equals_its_window_alone(
    transcriber, clips_file, tmp_path
):
    path, _ = clips_file
    cut = LongForm(chunk_length=6.0)
    result = transcriber.transcribe(path, cut, batch_size=4)
    segments = result["segments"]
    assert segments[0]["start"] == 0 and segments[-1]["end"] == pytest.approx(result["duration"])
    assert all(a["end"] == b["start"] for a, b in zip(segments, segments[1:], strict=False))
    assert all(s["end"] - s["start"] <= 6.0 + 1e-9 for s in segments)
    for segment in segments:
        assert segment["text"] == alone(
            transcriber, path, segment["start"], segment["end"], tmp_path
        )


def test_a_click_between_clips_does_not_move_the_cut_into_a_word(speech):
    """Speech to 9.0 s, a 0.5 s click at 9.1-9.6 s, speech again from 9.8 s: the window that
    must end by 10 s is cut in one of the quiet stretches, not in the click or a word."""
    rng = np.random.default_rng(0)
    click = 0.8 * rng.standard_normal(round(0.5 * RATE)).astype(np.float32)
    tiled = np.tile(speech, 3)
    x = np.concatenate([tiled[: 9 * RATE], silence(0.1), click, silence(0.2), tiled[: 5 * RATE]])
    cut = windows(Recording(None, x), "fixed", 10.0)[0].end / RATE
    assert 9.0 <= cut <= 9.1 or 9.6 <= cut <= 9.8, cut


def test_silence_alone_gives_no_segments_under_vad(transcriber, tmp_path):
    path = tmp_path / "quiet.wav"
    soundfile.write(path, silence(12.0), RATE)
    result = transcriber.transcribe(path, LongForm(segmentation="vad", chunk_length=10.0))
    assert result["segments"] == [] and result["text"] == "" and result["warnings"] == []


def test_clip_timestamps_keep_the_file_time(transcriber, clips_file):
    path, _ = clips_file
    result = transcriber.transcribe(path, LongForm(chunk_length=5.0, clip_timestamps="2,9,12"))
    starts = [s["start"] for s in result["segments"]]
    assert starts[0] == pytest.approx(2.0) and result["segments"][-1]["end"] == pytest.approx(
        result["duration"]
    )
    assert any(s["start"] == pytest.approx(12.0) for s in result["segments"])
    assert all(not (9.0 < s["start"] < 12.0) for s in result["segments"])


def test_subtitle_files_parse_with_real_parsers_and_keep_their_times(
    transcriber, clips_file, tmp_path
):
    path, _ = clips_file
    result = transcriber.transcribe(path, LongForm(segmentation="vad", chunk_length=10.0))
    written = writers.write(result, path, tmp_path, writers.formats("all"), 12, 2)
    assert sorted(p.suffix for p in written) == [".json", ".srt", ".tsv", ".txt", ".vtt"]
    subtitles = list(srt.parse((tmp_path / "three.srt").read_text()))
    assert [s.index for s in subtitles] == list(range(1, len(subtitles) + 1))
    assert len(subtitles) >= len(result["segments"])
    assert subtitles[0].start.total_seconds() == pytest.approx(
        result["segments"][0]["start"], abs=1e-3
    )
    assert subtitles[-1].end.total_seconds() == pytest.approx(
        result["segments"][-1]["end"], abs=1e-3
    )
    assert all(
        len(line) <= 12 or " " not in line for s in subtitles for line in s.content.split("\n")
    )
    assert all(len(s.content.split("\n")) <= 2 for s in subtitles)
    captions = webvtt.from_string((tmp_path / "three.vtt").read_text())
    assert [c.start for c in captions] == [
        writers.timestamp(s.start.total_seconds(), ".") for s in subtitles
    ]
    tsv = (tmp_path / "three.tsv").read_text().splitlines()
    assert tsv[0] == "start\tend\ttext"
    assert int(tsv[1].split("\t")[0]) == round(1000 * result["segments"][0]["start"])
    data = json.loads((tmp_path / "three.json").read_text())
    assert {"text", "segments", "language", "duration", "warnings"} <= set(data)
    assert {"id", "start", "end", "text", "tokens"} <= set(data["segments"][0])


def test_the_command_writes_files_and_prints_as_before(model_dir, clips_file, tmp_path, capsys):
    path, _ = clips_file
    capsys.readouterr()
    argv = ["transcribe", str(path), "--model", str(model_dir), "--max-new-tokens", str(TOKENS)]
    code = main([*argv, "--chunk-length", "10", "-f", "srt", "-o", str(tmp_path), "--quiet"])
    out = capsys.readouterr().out
    assert code == 0 and out.startswith(f"{path}: ") and len(out.splitlines()) == 1
    assert (tmp_path / "three.srt").exists() and not (tmp_path / "three.vtt").exists()


def test_overlapping_windows_are_reconciled_by_matching_words():
    segments = [
        {"text": "the cat sat on the mat"},
        {"text": "on the mat. And then"},
        {"text": "nothing shared here"},
    ]
    _reconcile(segments)
    assert [s["text"] for s in segments] == [
        "the cat sat on the mat",
        "And then",
        "nothing shared here",
    ]


def test_plus_tags_become_words_and_speakers():
    text, words = parse_word_timestamps("hello [T:45] world [T:82] _ [T:90]", offset=10.0)
    assert text == "hello world _"
    assert words[0] == {"word": "hello", "start": 10.0, "end": 10.45}
    assert words[1] == {"word": "world", "start": 10.45, "end": 10.82}
    text, turns = parse_speakers("[Speaker 1]: hi there [Speaker 2]: hello")
    assert text == "hi there hello"
    assert turns == [
        {"speaker": "Speaker 1", "text": "hi there"},
        {"speaker": "Speaker 2", "text": "hello"},
    ]


def test_prompts_in_the_model_cards_forms():
    assert Ask().instruction(plus=False) is None  # the default request, as always
    assert Ask(language="fr").instruction(plus=False) == (
        "transcribe the French speech with proper punctuation and capitalization."
    )
    assert Ask(task="translate", target_language="de").instruction(plus=False) == (
        "translate the speech to German with proper punctuation and capitalization."
    )
    assert Ask(keywords=("Granite", "FMS")).instruction(plus=False) == (
        "transcribe the speech to text. Keywords: Granite, FMS"
    )
    assert Ask(prompt_mode="word_timestamps").instruction(plus=True).startswith("Timestamps:")


def one_line_error(capsys, *argv) -> str:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_bad_long_form_input_is_one_line(capsys, clips_file, tmp_path):
    path, _ = clips_file
    base = ["transcribe", path, "--model", "tiny"]
    err = one_line_error(capsys, *base, "--max-audio-seconds", "10")
    assert "longer than --max-audio-seconds 10" in err
    assert "--chunk-length must be above 0" in one_line_error(capsys, *base, "--chunk-length", "0")
    err = one_line_error(capsys, *base, "--chunk-length", "5", "--chunk-overlap", "5")
    assert "--chunk-overlap 5 must be at least 0 and below --chunk-length 5" in err
    assert "unknown language" in one_line_error(capsys, *base, "--language", "klingon")
    err = one_line_error(capsys, *base, "--prompt-mode", "speaker_attributed")
    assert "only Granite Speech 4.1 Plus has modes" in err
    err = one_line_error(capsys, "transcribe", path, "--model", "tiny-ctc", "--language", "en")
    assert "takes no prompt" in err
    assert "needs --target-language" in one_line_error(capsys, *base, "--task", "translate")


def test_a_header_that_lies_about_the_length_is_handled(capsys, tmp_path, speech):
    """A WAV whose header says it holds 10 hours (a broken recorder's data size): the audio
    that is there is read, no 10-hour buffer is made, and the result says its real length."""
    path = tmp_path / "liar.wav"
    soundfile.write(path, np.tile(speech, 2), RATE, subtype="PCM_16")
    data = bytearray(path.read_bytes())
    at = data.index(b"data") + 4
    data[at : at + 4] = struct.pack("<I", 10 * 3600 * RATE * 2)
    path.write_bytes(bytes(data))
    capsys.readouterr()
    argv = ["transcribe", path, "--model", "tiny", "--quiet", "--json", "--max-new-tokens", "2"]
    assert main([*map(str, argv), "--chunk-length", "5"]) == 0
    result = json.loads(capsys.readouterr().out)[0]
    assert result["duration"] == pytest.approx(2 * len(speech) / RATE, abs=1e-3)
    assert result["segments"][-1]["end"] == pytest.approx(result["duration"])


def test_a_corpus_run_windows_its_long_recordings(model_dir, clips_file, tmp_path):
    """A manifest with a short clip and a long recording: the long one's line carries its
    segments, and its text is the long-form path's."""
    path, _ = clips_file
    short = tmp_path / "short.wav"
    soundfile.write(short, soundfile.read(path, dtype="float32")[0][: 3 * RATE], RATE)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        json.dumps({"audio": str(short), "id": "short"})
        + "\n"
        + json.dumps({"audio": str(path), "id": "long"})
        + "\n"
    )
    out = tmp_path / "out.jsonl"
    argv = ["transcribe", "--manifest", manifest, "--out", out, "--model", model_dir]
    assert main([*map(str, argv), "--chunk-length", "10", "--quiet"]) == 0
    lines = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert "segments" not in lines["short"]
    expected = Transcriber(model_dir).transcribe(path, LongForm(chunk_length=10.0))
    assert lines["long"]["text"] == expected["text"]
    assert [s["start"] for s in lines["long"]["segments"]] == [
        s["start"] for s in expected["segments"]
    ]
