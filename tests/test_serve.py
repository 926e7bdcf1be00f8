"""`gsopt serve` and the continuous batching under it, on a tiny checkpoint (CPU).

The checkpoint is test_transcribe's: tiny dimensions, weights scaled so that every clip
gives its own text, end-of-text made likely so rows stop at different steps, a word-level
tokenizer with a chat template. Servers run in a thread of this process (uvicorn on a free
port), except the one that gets SIGTERM, which runs the command in a subprocess. Clients are
the real `openai` package (sync and async) and httpx for what it cannot send.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import soundfile
import torch
import uvicorn
from helpers import add_lora, save_checkpoint
from test_transcribe import (
    EOS_ID,
    EOS_LOOKALIKE,
    audible_reference,
    speechlike,
    word_level_tokenizer,
)

from gsopt import cli
from gsopt.audio.files import load_audio
from gsopt.engine.scheduler import Scheduler, Sequence
from gsopt.errors import GsoptError
from gsopt.model.tokenizer import decode
from gsopt.recipe import build_pipeline
from gsopt.transcription.server import MAX_UPLOAD_BYTES, ServeOptions, Service, create_app
from gsopt.transcription.transcriber import Transcriber

GRAIN = "timestamp_granularities"
BUDGET = 16  # new tokens per file and per window, here and in `gsopt transcribe`
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    ref = audible_reference(seed=11)
    with torch.no_grad():  # rows of one batch stop at different steps
        ref.lm_head.weight[EOS_ID] = 1.05 * ref.lm_head.weight[EOS_LOOKALIKE]
    path = save_checkpoint(ref, tmp_path_factory.mktemp("served"), lora=add_lora(ref, seed=12))
    word_level_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> list[Path]:
    """16 distinct short clips (0.4-2.6 s, several rates) and, last, a 40 s recording."""
    where = tmp_path_factory.mktemp("clips")
    paths = []
    for seed in range(16):
        rate = (16000, 22050, 8000, 44100)[seed % 4]
        data = speechlike(round(rate * (0.4 + 0.15 * seed)), rate, seed)
        paths.append(where / f"clip{seed:02d}.wav")
        soundfile.write(paths[-1], data, rate)
    pieces = [speechlike(16000 * 5, 16000, 20 + i) for i in range(8)]
    soundfile.write(where / "long.wav", np.concatenate(pieces), 16000)
    return [*paths, where / "long.wav"]


@pytest.fixture(scope="module")
def transcriber(folder) -> Transcriber:
    transcriber = Transcriber(folder, recipe="static-kv", max_new_tokens=BUDGET)
    transcriber.load()
    return transcriber


def alone(transcriber: Transcriber, wave: torch.Tensor, budget: int = BUDGET) -> list[int]:
    """The static engine's tokens for one clip, batch of one."""
    return transcriber.run_batch(0, ["clip"], [wave], max_new_tokens=budget)[0].tokens


@contextlib.contextmanager
def live(service: Service):
    """The service's app on a free port, in a thread; yields its base URL."""
    service.start()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    config = uvicorn.Config(create_app(service), log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join()
        service.stop()


@pytest.fixture(scope="module")
def served(transcriber):
    service = Service(transcriber, ServeOptions(max_batch=4, max_new_tokens=BUDGET))
    service.warm_up()
    with live(service) as url:
        yield service, url


def client(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def metric(url: str, name: str, **labels: str) -> float:
    """One sample of /metrics (0 when absent)."""
    text = httpx.get(f"{url}/metrics").text
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
        if match and (match.group(1) or "") == want:
            return float(match.group(2))
    return 0.0


def slow_steps(monkeypatch, service: Service, seconds: float) -> None:
    """Each decode burst of the service's scheduler takes `seconds` longer."""
    scheduler = service.scheduler
    decode = scheduler._decode

    def slow() -> None:
        time.sleep(seconds)
        decode()

    monkeypatch.setattr(scheduler, "_decode", slow)


def wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# --- the scheduler against the static engine -------------------------------------------------


def test_scheduler_tokens_equal_each_clip_alone_with_admissions_mid_decode(transcriber, clips):
    waves = [load_audio(path) for path in clips[:10]]
    budgets = [BUDGET + i % 3 for i in range(len(waves))]
    expected = [alone(transcriber, w, b) for w, b in zip(waves, budgets, strict=True)]
    assert len({tuple(e) for e in expected}) > 5, "degenerate clips would prove little"
    assert len({len(e) for e in expected}) > 2, "rows must stop at different steps"
    scheduler = Scheduler(transcriber.pipeline, 3)
    seqs = [Sequence(w, transcriber.template, b) for w, b in zip(waves, budgets, strict=True)]
    for seq in seqs[:4]:
        scheduler.submit(seq)
    for _ in range(3):
        scheduler.step()
    assert 0 < scheduler.active and any(s.tokens for s in seqs[:3]), "mid-decode"
    for seq in seqs[4:]:  # arrive while the first rows are decoding
        scheduler.submit(seq)
    mid_decode = []
    while not scheduler.idle:
        before = scheduler.stats.admissions
        busy = {id(row) for row in scheduler.rows if row is not None and row.tokens}
        scheduler.step()
        if scheduler.stats.admissions > before and busy:
            mid_decode.append(busy)
    assert [s.tokens for s in seqs] == expected
    assert all(s.finished and s.error is None for s in seqs)
    assert len(mid_decode) >= 3, "rows must join while others are mid-decode"
    assert scheduler.stats.tokens == sum(map(len, expected))


def test_a_cancelled_row_frees_its_slot_and_the_others_keep_their_tokens(transcriber, clips):
    waves = [load_audio(path) for path in clips[:3]]
    scheduler = Scheduler(transcriber.pipeline, 2)
    seqs = [Sequence(w, transcriber.template, 40) for w in waves]
    for seq in seqs:
        scheduler.submit(seq)
    scheduler.step()
    assert scheduler.active == 2 and scheduler.queued == 1
    scheduler.cancel(seqs[0])
    scheduler.step()  # the slot goes to the waiting clip at once
    assert seqs[0].finished and seqs[2] in scheduler.rows
    scheduler.drain()
    assert [s.tokens for s in seqs[1:]] == [alone(transcriber, w, 40) for w in waves[1:]]
    assert scheduler.stats.cancelled == 1


def test_admission_takes_turns_by_request_within_the_audio_budget(transcriber, clips):
    """A request of six windows, then a short one: the short one is admitted second, not
    seventh; and one round admits no more padded audio than the budget (but at least one)."""
    wave = load_audio(clips[5])
    scheduler = Scheduler(transcriber.pipeline, 1)
    order = []
    long = [Sequence(wave, transcriber.template, 2, group="long") for _ in range(6)]
    short = Sequence(wave[:8000], transcriber.template, 2, group="short")
    for seq in [*long, short]:
        seq.listener = lambda s, _: order.append(s) if s.finished else None
        scheduler.submit(seq)
    scheduler.drain()
    assert order.index(short) == 1
    budget = 2.5 * len(wave) / 16000
    scheduler = Scheduler(transcriber.pipeline, 8, admit_seconds=budget)
    for _ in range(5):
        scheduler.submit(Sequence(wave, transcriber.template, 2))
    scheduler.step()
    assert scheduler.stats.admitted == 2
    tiny_budget = Scheduler(transcriber.pipeline, 8, admit_seconds=0.01)
    tiny_budget.submit(Sequence(wave, transcriber.template, 2))
    tiny_budget.step()
    assert tiny_budget.stats.admitted == 1


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        ("speculative-ctc", "speculative recipes are not supported"),
        ("eager", "needs the static KV cache"),
    ],
)
def test_unsupported_recipes_are_refused_in_one_line(transcriber, recipe, message):
    pipeline = build_pipeline(transcriber.pipeline.model, recipe)
    with pytest.raises(GsoptError, match=message):
        Scheduler(pipeline, 2)


def test_beam_recipes_are_refused_by_the_command(folder, capsys, tmp_path):
    beams = tmp_path / "beams.toml"
    beams.write_text('kv_cache = "static"\nnum_beams = 2\n')
    assert cli.main(["serve", "--model", str(folder), "--recipe", str(beams)]) == 2
    err = capsys.readouterr().err.strip()
    assert "num_beams = 2: beam search is not supported" in err and len(err.splitlines()) == 1


# --- the server -------------------------------------------------------------------------------


def test_every_response_format_equals_the_transcribe_command(
    served, clips, folder, tmp_path, capsys
):
    service, url = served
    api = client(url)
    for path in (clips[3], clips[-1]):  # one window, and a 40 s recording in two
        code = cli.main(
            [
                "transcribe", str(path), "--model", str(folder), "--recipe", "static-kv",
                "--max-new-tokens", str(BUDGET), "-f", "all", "-o", str(tmp_path), "--quiet",
            ]
        )  # fmt: skip
        assert code == 0
        capsys.readouterr()
        files = {kind: (tmp_path / f"{path.stem}.{kind}").read_text() for kind in ("srt", "vtt")}
        want = json.loads((tmp_path / f"{path.stem}.json").read_text())
        assert want["text"]

        def ask(fmt: str, path: Path = path, **extra):
            with path.open("rb") as f:
                return api.audio.transcriptions.create(
                    model=service.model_id, file=f, response_format=fmt, **extra
                )

        assert ask("json").text == want["text"]
        assert ask("text") == want["text"]
        assert ask("srt") == files["srt"]
        assert ask("vtt") == files["vtt"]
        verbose = ask("verbose_json", timestamp_granularities=["segment"])
        assert verbose.text == want["text"] and verbose.duration == pytest.approx(want["duration"])
        got = [(s.start, s.end, s.text) for s in verbose.segments]
        assert got == [(s["start"], s["end"], s["text"]) for s in want["segments"]]
    assert len(want["segments"]) == 2


def test_translations_equal_the_command_with_task_translate(served, clips, folder, capsys):
    service, url = served
    code = cli.main(
        [
            "transcribe", str(clips[2]), "--model", str(folder), "--recipe", "static-kv",
            "--max-new-tokens", str(BUDGET), "--task", "translate", "--target-language", "en",
            "--json", "--quiet",
        ]
    )  # fmt: skip
    assert code == 0
    want = json.loads(capsys.readouterr().out)[0]["text"]
    with clips[2].open("rb") as f, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the client's note on the endpoint
        got = client(url).audio.translations.create(model=service.model_id, file=f)
    assert got.text == want


def test_sixteen_concurrent_clients_each_get_their_own_text(served, clips, transcriber):
    service, url = served
    tokenizer = transcriber.tokenizer
    expected = [decode(tokenizer, alone(transcriber, load_audio(p))) for p in clips[:16]]
    assert len(set(expected)) > 10, "distinct clips must give distinct texts"

    async def main() -> list[str]:
        api = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)

        async def one(path: Path) -> str:
            result = await api.audio.transcriptions.create(
                model=service.model_id, file=(path.name, path.read_bytes())
            )
            return result.text

        return await asyncio.gather(*(one(p) for p in clips[:16]))

    before = service.scheduler.stats.admissions
    assert asyncio.run(main()) == expected
    assert service.scheduler.stats.admissions - before > 4, "requests joined a running batch"


def test_streamed_deltas_concatenate_to_the_final_text(served, clips):
    service, url = served
    for path in (clips[7], clips[-1]):
        with path.open("rb") as f:
            events = list(
                client(url).audio.transcriptions.create(model=service.model_id, file=f, stream=True)
            )
        kinds = [e.type for e in events]
        assert kinds[-1] == "transcript.text.done" and set(kinds[:-1]) == {"transcript.text.delta"}
        assert len(kinds) > 2
        with path.open("rb") as f:
            whole = client(url).audio.transcriptions.create(model=service.model_id, file=f).text
        assert "".join(e.delta for e in events[:-1]) == events[-1].text == whole


def test_bad_inputs_get_their_status_before_any_model_work(served, clips, tmp_path):
    service, url = served
    good = clips[0].read_bytes()
    long = tmp_path / "long.wav"
    soundfile.write(long, np.zeros(601 * 1000, dtype=np.int16), 1000)
    wav = ("a.wav", good)
    model = {"model": service.model_id}
    verbose = {**model, "response_format": "verbose_json"}
    cases = [  # status, the param it names, form fields, files
        (400, "file", model, {}),
        (400, "file", {**model, "file": "not a file"}, {}),
        (400, "file", model, {"file": ("a.wav", b"")}),
        (400, "file", model, {"file": ("README.md", b"# not audio\n" * 9)}),
        (400, "file", model, {"file": ("long.wav", long.read_bytes())}),
        (413, "file", model, {"file": ("big.wav", b"0" * (MAX_UPLOAD_BYTES + 1))}),
        (400, "model", {}, {"file": wav}),
        (404, "model", {"model": "whisper-1"}, {"file": wav}),
        (400, "temperature", {**model, "temperature": "hot"}, {"file": wav}),
        (400, "temperature", {**model, "temperature": "0.4"}, {"file": wav}),
        (400, "response_format", {**model, "response_format": "xml"}, {"file": wav}),
        (400, "stream", {**model, "stream": "maybe"}, {"file": wav}),
        (400, "stream", {**model, "stream": "true", "response_format": "srt"}, {"file": wav}),
        (400, "language", {**model, "language": "klingon"}, {"file": wav}),
        (400, GRAIN, {**model, f"{GRAIN}[]": "segment"}, {"file": wav}),
        (400, GRAIN, {**verbose, f"{GRAIN}[]": "word"}, {"file": wav}),
        (400, GRAIN, {**verbose, f"{GRAIN}[]": "sentence"}, {"file": wav}),
    ]
    admitted = service.scheduler.stats.admitted
    for status, param, data, files in cases:
        response = httpx.post(f"{url}/v1/audio/transcriptions", data=data, files=files or None)
        assert response.status_code == status, (param, data, response.text)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
        assert error["type"] == "invalid_request_error" and error["message"]
    response = httpx.post(f"{url}/v1/audio/transcriptions", json={"model": service.model_id})
    assert response.status_code == 400 and "multipart" in response.json()["error"]["message"]
    assert service.scheduler.stats.admitted == admitted, "a bad request reached the model"
    assert metric(url, "gsopt_requests_total", endpoint="transcriptions", status="413") == 1


def test_models_health_and_metrics(served, clips):
    service, url = served
    models = client(url).models.list()
    assert [m.id for m in models.data] == [service.model_id] == ["served0"]
    assert httpx.get(f"{url}/health").json()["status"] == "ready"
    with clips[1].open("rb") as f:
        client(url).audio.transcriptions.create(model=service.model_id, file=f)
    text = httpx.get(f"{url}/metrics").text
    for name in (
        "gsopt_requests_total",
        "gsopt_queue_depth",
        "gsopt_active_slots",
        "gsopt_tokens_per_second",
        "gsopt_audio_seconds_per_second",
        "gsopt_generated_tokens_total",
        "gsopt_request_latency_seconds_bucket",
        "gsopt_queue_wait_seconds_bucket",
    ):
        assert name in text
    assert metric(url, "gsopt_requests_total", endpoint="transcriptions", status="200") >= 1
    assert metric(url, "gsopt_slots") == 4


def test_without_the_key_requests_are_refused(transcriber, clips):
    service = Service(transcriber, ServeOptions(max_batch=2, api_key="s3cret"))
    with live(service) as url:
        for key in ("wrong", "none"):
            with pytest.raises(openai.AuthenticationError), clips[0].open("rb") as f:
                client(url, key).audio.transcriptions.create(model=service.model_id, file=f)
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/health").status_code == 200
        with clips[0].open("rb") as f:
            ok = client(url, "s3cret").audio.transcriptions.create(model=service.model_id, file=f)
        assert ok.text


def test_a_disconnecting_client_cancels_its_rows_and_frees_the_slots(
    transcriber, clips, monkeypatch
):
    service = Service(transcriber, ServeOptions(max_batch=2, max_new_tokens=200))
    slow_steps(monkeypatch, service, 0.05)  # 200 tokens would take 10 s
    with live(service) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                f"{url}/v1/audio/transcriptions",
                data={"model": service.model_id},
                files={"file": ("a.wav", clips[4].read_bytes())},
                timeout=httpx.Timeout(5.0, read=1.0),
            )
        wait_for(lambda: metric(url, "gsopt_active_slots") == 0, timeout=3.0)
        assert metric(url, "gsopt_requests_total", endpoint="transcriptions", status="499") == 1
        assert metric(url, "gsopt_cancelled_windows_total") == 1
        assert service.scheduler.stats.tokens < 60


def test_a_slow_request_gets_504_and_its_slots_back(transcriber, clips, monkeypatch):
    service = Service(
        transcriber, ServeOptions(max_batch=2, max_new_tokens=200, request_timeout=0.5)
    )
    slow_steps(monkeypatch, service, 0.05)
    with live(service) as url:
        with clips[4].open("rb") as f, pytest.raises(openai.APIStatusError) as raised:
            client(url).audio.transcriptions.create(model=service.model_id, file=f)
        assert raised.value.status_code == 504
        assert "--request-timeout" in raised.value.body["message"]
        wait_for(lambda: service.scheduler.idle, timeout=2.0)


def test_a_full_queue_answers_429_with_retry_after(transcriber, clips, monkeypatch):
    service = Service(transcriber, ServeOptions(max_batch=1, max_queue=1, max_new_tokens=12))
    slow_steps(monkeypatch, service, 0.05)
    with live(service) as url:
        results = {}

        def post(name: str, path: Path) -> None:
            results[name] = httpx.post(
                f"{url}/v1/audio/transcriptions",
                data={"model": service.model_id},
                files={"file": (path.name, path.read_bytes())},
                timeout=30,
            )

        first = threading.Thread(target=post, args=("first", clips[4]))
        first.start()
        wait_for(lambda: service.scheduler.active == 1)
        second = threading.Thread(target=post, args=("second", clips[5]))
        second.start()
        wait_for(lambda: service.scheduler.queued == 1)
        post("third", clips[6])
        first.join()
        second.join()
    assert results["third"].status_code == 429
    assert int(results["third"].headers["retry-after"]) >= 1
    assert results["third"].json()["error"]["type"] == "rate_limit_error"
    assert results["first"].status_code == results["second"].status_code == 200


def test_an_exception_in_one_request_is_a_500_for_it_alone(served, clips, transcriber, monkeypatch):
    service, url = served
    pipeline = service.scheduler.pipeline
    embed = pipeline.embed_audio
    poisoned = len(load_audio(clips[8]))

    def faulty(waves, stages, timer=None):
        if any(len(w) == poisoned for w in waves):
            raise RuntimeError("injected fault")
        return embed(waves, stages, timer)

    monkeypatch.setattr(pipeline, "embed_audio", faulty)
    tokenizer = transcriber.tokenizer

    async def main():
        api = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        calls = [
            api.audio.transcriptions.create(model=service.model_id, file=(p.name, p.read_bytes()))
            for p in clips[6:11]
        ]
        return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(main())
    for path, result in zip(clips[6:11], results, strict=True):
        if path == clips[8]:
            assert isinstance(result, openai.InternalServerError)
            assert "injected fault" in result.body["message"]
        else:
            monkeypatch.setattr(pipeline, "embed_audio", embed)
            want = decode(tokenizer, alone(transcriber, load_audio(path)))
            monkeypatch.setattr(pipeline, "embed_audio", faulty)
            assert result.text == want
    monkeypatch.undo()
    with clips[0].open("rb") as f:  # the engine went on
        assert client(url).audio.transcriptions.create(model=service.model_id, file=f).text


SLOW_SERVE = """
import sys, time
from gsopt import cli
from gsopt.engine.scheduler import Scheduler
decode = Scheduler._decode
def slow(self):
    time.sleep(0.03)
    decode(self)
Scheduler._decode = slow
sys.exit(cli.main(sys.argv[1:]))
"""


def test_sigterm_finishes_requests_in_flight_and_exits(folder, clips):
    """The command in a subprocess (its decode steps slowed), asked to bind widely without
    a key: it warns and binds localhost; SIGTERM mid-stream lets the stream finish."""
    args = ["serve", "--model", str(folder), "--recipe", "static-kv", "--port", "0"]
    args += ["--host", "0.0.0.0", "--max-new-tokens", "60", "--max-batch", "2"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_SERVE, *args],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        lines = []
        while not lines or not lines[-1].startswith("gsopt serve: ready: "):
            line = proc.stderr.readline()
            assert line, "".join(lines)
            lines.append(line)
        assert any("binding 127.0.0.1 instead of 0.0.0.0" in line for line in lines)
        url = re.search(r"http://\S+", lines[-1]).group(0)
        with clips[4].open("rb") as f:
            stream = client(url).audio.transcriptions.create(model="served0", file=f, stream=True)
            events = iter(stream)
            first = next(events)
            assert first.type == "transcript.text.delta"
            proc.send_signal(signal.SIGTERM)
            rest = list(events)
        assert rest[-1].type == "transcript.text.done"
        assert first.delta + "".join(e.delta for e in rest[:-1]) == rest[-1].text
        assert proc.wait(timeout=30) == 0
        assert "stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
