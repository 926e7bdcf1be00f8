"""An OpenAI-compatible transcription server on the continuously batched engine.

`create_app(service)` is a FastAPI app with OpenAI's audio API (`POST /v1/audio/transcriptions`
and `/v1/audio/translations`, multipart), `GET /v1/models`, `GET /health` and `GET /metrics`
(Prometheus text). `Service` owns the loaded model and its `Scheduler`, which runs on the
thread that loaded the model (`gsopt serve`) or on one of its own (`Service.start`); request
handlers hand it windows and wait for their tokens.

A request's life: the form is checked (fields, types, the 25 MB and 600 s caps, that the
file is audio) before any model work, and each mistake answers 400/404/413 in OpenAI's
error JSON. The recording is cut as `gsopt transcribe` cuts it: one window up to
--chunk-length (30 s) with the --max-new-tokens budget, longer files in fixed windows with
200 tokens per 30 s (`gsopt.transcription.longform`), so each response's text equals the
command's. The windows join the scheduler's queue (429 with Retry-After when it is full),
and the result is stitched by longform's helpers and rendered in the format asked. A client
that disconnects cancels its windows, which frees their slots; past --request-timeout the
windows are cancelled and the answer is 504; a window that fails answers 500 for its request
alone. Every request's text comes from its own sequences' tokens, so no request can get
another's.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import secrets
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from gsopt.audio.files import Recording, check_audio_file, read_recording
from gsopt.audio.frontend import SAMPLE_RATE
from gsopt.audio.windows import Window, windows
from gsopt.engine.scheduler import DEFAULT_ADMIT_SECONDS, Scheduler, Sequence
from gsopt.errors import GsoptError
from gsopt.model.family import is_variant
from gsopt.model.tokenizer import decode, prompt_ids
from gsopt.transcription import writers
from gsopt.transcription.longform import LongForm, Piece, _result
from gsopt.transcription.prompts import Ask, language_code
from gsopt.transcription.transcriber import DEFAULT_MAX_NEW_TOKENS, Transcriber

log = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 25 * 1024 * 1024  # OpenAI's and vLLM's caps
MAX_AUDIO_SECONDS = 600.0
FORM_OVERHEAD_BYTES = 64 * 1024  # the multipart envelope and the other fields
RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
STREAM_FORMATS = ("json", "text")
GRANULARITIES = ("segment", "word")
POLL_SECONDS = 0.1  # how often a waiting request looks for its client's disconnect
RATE_INTERVAL = 1.0  # the shortest interval the tokens/s and audio s/s gauges average over


class ApiError(Exception):
    """A request's failure as OpenAI's error JSON: {"error": {message, type, param, code}}."""

    TYPES = {429: "rate_limit_error", 500: "server_error", 503: "server_error"}

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        kind = self.TYPES.get(self.status, "server_error" if self.status >= 500 else None)
        body = {
            "message": self.message,
            "type": kind or "invalid_request_error",
            "param": self.param,
            "code": self.code,
        }
        return JSONResponse({"error": body}, status_code=self.status, headers=self.headers)


class ClientGone(Exception):
    """The client disconnected; its windows were cancelled."""


@dataclass(frozen=True)
class ServeOptions:
    """The server's limits: slots, the queue (windows waiting for a slot), the per-request
    timeout (None: none), the token budget of a one-window file (None: 200, and 200 per
    30 s for windows of longer files, as `gsopt transcribe`), the window length, and the
    admission budget (`gsopt.engine.scheduler`)."""

    max_batch: int = 16
    api_key: str | None = None
    request_timeout: float | None = None
    max_queue: int = 256
    max_new_tokens: int | None = None
    chunk_length: float = 30.0
    admit_seconds: float = DEFAULT_ADMIT_SECONDS


@dataclass(frozen=True)
class Params:
    """One request's form fields, checked."""

    task: str
    prompt: str | None
    language: str | None
    response_format: str
    granularities: tuple[str, ...]
    stream: bool


class Job:
    """One request's windows in the scheduler. Listeners run on the scheduler's thread and
    hand each update to the event loop, where `changed` wakes the waiting handler."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sequences: list[Sequence]):
        self.loop = loop
        self.sequences = sequences
        self.pending = len(sequences)
        self.changed = asyncio.Event()
        self.first_admitted: float | None = None
        for seq in sequences:
            seq.listener = self._listen

    def _listen(self, seq: Sequence, fresh: list[int]) -> None:
        final = seq.finished  # read here, on the scheduler's thread
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits
            self.loop.call_soon_threadsafe(self._update, seq, final)

    def _update(self, seq: Sequence, final: bool) -> None:
        if seq.admitted is not None and self.first_admitted is None:
            self.first_admitted = seq.admitted
        self.pending -= final
        self.changed.set()

    @property
    def done(self) -> bool:
        return self.pending == 0

    def failure(self) -> BaseException | None:
        return next((s.error for s in self.sequences if s.error is not None), None)


class Metrics:
    """Prometheus metrics in a registry of their own (one per service)."""

    def __init__(self, service: Service):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "gsopt_requests",
            "Requests answered, by endpoint and HTTP status (499: the client went away)",
            ["endpoint", "status"],
            registry=self.registry,
        )
        buckets = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)
        self.latency = Histogram(
            "gsopt_request_latency_seconds",
            "Seconds from a request's arrival to its answer (successful requests)",
            ["endpoint"],
            buckets=buckets,
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "gsopt_queue_wait_seconds",
            "Seconds a request waited for its first window to take a slot",
            buckets=buckets,
            registry=self.registry,
        )
        scheduler = service.scheduler
        gauges = (
            ("gsopt_queue_depth", "Windows waiting for a slot", lambda: scheduler.queued),
            ("gsopt_active_slots", "Slots holding a window", lambda: scheduler.active),
            ("gsopt_slots", "Slots in the continuous batch (--max-batch)", lambda: scheduler.slots),
        )
        for name, text, read in gauges:
            Gauge(name, text, registry=self.registry).set_function(read)
        self.registry.register(_EngineCollector(scheduler))

    def count(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()


class _EngineCollector:
    """The scheduler's running totals as counters, and their rates since the previous
    scrape (at least RATE_INTERVAL apart) as gauges."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self.last = (time.perf_counter(), 0, 0.0)
        self.rates = (0.0, 0.0)

    def collect(self):
        stats = self.scheduler.stats
        now = time.perf_counter()
        then, tokens, audio = self.last
        if now - then >= RATE_INTERVAL:
            self.rates = (
                (stats.tokens - tokens) / (now - then),
                (stats.audio_seconds - audio) / (now - then),
            )
            self.last = (now, stats.tokens, stats.audio_seconds)
        totals = (
            ("gsopt_generated_tokens", "Tokens generated", stats.tokens),
            ("gsopt_audio_seconds", "Seconds of audio transcribed", stats.audio_seconds),
            ("gsopt_decode_steps", "Decode steps over all slots", stats.decode_steps),
            ("gsopt_admissions", "Admission rounds (audio stages and prefill)", stats.admissions),
            ("gsopt_cancelled_windows", "Windows cancelled (disconnect, timeout)", stats.cancelled),
            ("gsopt_failed_windows", "Windows that failed", stats.failed),
        )
        for name, text, value in totals:
            yield CounterMetricFamily(name, text, value=value)
        yield GaugeMetricFamily(
            "gsopt_tokens_per_second", "Tokens generated per second", value=self.rates[0]
        )
        yield GaugeMetricFamily(
            "gsopt_audio_seconds_per_second",
            "Seconds of audio transcribed per second of wall time",
            value=self.rates[1],
        )


def served_name(source: str | Path) -> str:
    """The model's id in /v1/models: a variant's name or the checkpoint folder's name."""
    return str(source) if is_variant(source) else Path(source).resolve().name


class Service:
    """The loaded model, its scheduler on a thread of its own, and what requests share."""

    def __init__(self, transcriber: Transcriber, options: ServeOptions = ServeOptions()):
        """`transcriber` must be loaded (`Transcriber.load`)."""
        self.transcriber = transcriber
        self.options = options
        self.config = transcriber.config
        self.cut = LongForm(
            chunk_length=options.chunk_length, max_new_tokens=options.max_new_tokens
        )
        self.short_budget = options.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
        self.scheduler = Scheduler(
            transcriber.pipeline,
            options.max_batch,
            positions=self._positions(),
            admit_seconds=options.admit_seconds,
        )
        self.model_id = served_name(transcriber.source)
        self.created = int(time.time())
        self.plus = bool(self.config.encoder.cat_hidden_layers)
        self.metrics = Metrics(self)
        self.draining = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _positions(self) -> int:
        """Cache positions a slot holds: the longest window, the default prompt with room
        for a longer one, and the larger budget; within the decoder's limit."""
        config = self.config
        window = round(self.cut.chunk_length * SAMPLE_RATE)
        budget = max(self.short_budget, self.cut.budget(Window(0, window)))
        needed = config.audio_tokens(window) + len(self.transcriber.template) + 128 + budget
        return min(config.decoder.max_expected_seq_len, max(config.cache_positions, needed))

    # --- the engine thread --------------------------------------------------------------

    def warm_up(self) -> None:
        """One clip through the scheduler before serving, so compiling happens now."""
        from gsopt.audio.files import sample_audio

        seq = Sequence(sample_audio(), self.transcriber.template, 4)
        self.scheduler.submit(seq)
        self.scheduler.drain()
        if seq.error is not None:
            raise seq.error

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self.scheduler.run, args=(self._stop,), name="gsopt-scheduler", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Finish what is queued and running, then stop the scheduler's thread."""
        self._stop.set()
        self.scheduler.wake()
        if self._thread is not None:
            self._thread.join()

    # --- requests -----------------------------------------------------------------------

    @functools.lru_cache(maxsize=64)  # noqa: B019 - one service per process, kept to the end
    def template(self, ask: Ask, prompt: str | None) -> tuple[int, ...]:
        instruction = prompt if prompt is not None else ask.instruction(self.plus)
        ids = prompt_ids(self.transcriber.tokenizer, self.config.audio_token_id, instruction)
        return tuple(ids)

    def plan(self, recording: Recording) -> list[tuple[Window, int]]:
        """The recording's windows and their token budgets, as `gsopt transcribe` cuts it."""
        if recording.seconds <= self.cut.chunk_length:
            return [(Window(0, recording.num_samples), self.short_budget)]
        found = windows(recording, "fixed", self.cut.chunk_length)
        return [(window, self.cut.budget(window)) for window in found]

    def retry_after(self) -> int:
        """Seconds until the queue has likely moved: its audio at the recent rate."""
        rate = self.metrics.registry.get_sample_value("gsopt_audio_seconds_per_second") or 0.0
        waiting = self.scheduler.queued_seconds
        return max(1, min(60, math.ceil(waiting / rate))) if rate > 0 else 5


def _field(form, name: str, *, aliases: tuple[str, ...] = ()) -> list[Any]:
    values = []
    for key in (name, *aliases):
        values += form.getlist(key)
    return values


def _text_field(form, name: str, default: str | None = None) -> str | None:
    values = _field(form, name)
    if not values:
        return default
    if len(values) > 1:
        raise ApiError(400, f"{name}: given {len(values)} times; give it once", param=name)
    if not isinstance(values[0], str):
        raise ApiError(400, f"{name}: expected text, got a file", param=name)
    return values[0]


def parse_params(form, task: str, service: Service) -> tuple[UploadFile, Params]:
    """The upload and the checked fields; any mistake is an ApiError (400 or 404)."""
    files = _field(form, "file")
    if not files:
        raise ApiError(400, "file: required (the audio, as a multipart file upload)", param="file")
    if len(files) > 1 or not isinstance(files[0], UploadFile):
        raise ApiError(400, "file: expected one audio file upload", param="file")
    model = _text_field(form, "model")
    if model is None or not model.strip():
        raise ApiError(
            400, f"model: required; this server serves {service.model_id!r}", param="model"
        )
    if model != service.model_id:
        raise ApiError(
            404,
            f"model {model!r} is not served here; this server serves {service.model_id!r}",
            param="model",
            code="model_not_found",
        )
    temperature = _text_field(form, "temperature", "0")
    try:
        value = float(temperature)
    except ValueError:
        raise ApiError(
            400, f"temperature: expected a number, got {temperature!r}", param="temperature"
        ) from None
    if value != 0:
        raise ApiError(
            400,
            f"temperature {temperature}: only 0 is supported (greedy decoding)",
            param="temperature",
        )
    response_format = _text_field(form, "response_format", "json")
    if response_format not in RESPONSE_FORMATS:
        raise ApiError(
            400,
            f"response_format {response_format!r}: choose one of {', '.join(RESPONSE_FORMATS)}",
            param="response_format",
        )
    stream_text = (_text_field(form, "stream", "false") or "").strip().lower()
    if stream_text not in ("true", "false"):
        raise ApiError(400, f"stream: expected true or false, got {stream_text!r}", param="stream")
    stream = stream_text == "true"
    if stream and response_format not in STREAM_FORMATS:
        raise ApiError(
            400,
            f"stream: response_format {response_format} does not stream; use json or text",
            param="stream",
        )
    granularities = []
    for value in _field(form, "timestamp_granularities[]", aliases=("timestamp_granularities",)):
        if not isinstance(value, str) or value not in GRANULARITIES:
            raise ApiError(
                400,
                f"timestamp_granularities[]: {value!r}; choose from {', '.join(GRANULARITIES)}",
                param="timestamp_granularities",
            )
        granularities.append(value)
    if granularities and response_format != "verbose_json":
        raise ApiError(
            400,
            "timestamp_granularities[] needs response_format verbose_json",
            param="timestamp_granularities",
        )
    if "word" in granularities and (not service.plus or task != "transcribe"):
        raise ApiError(
            400,
            "timestamp_granularities[]: word timestamps come from Granite Speech 4.1 Plus's "
            "word_timestamps mode, in transcriptions; this model gives segments only",
            param="timestamp_granularities",
        )
    prompt = _text_field(form, "prompt")
    prompt = prompt if prompt and prompt.strip() else None
    try:
        language = language_code(_text_field(form, "language") or None, "language")
    except GsoptError as error:
        raise ApiError(400, str(error), param="language") from None
    if prompt is not None and (language is not None or "word" in granularities):
        raise ApiError(
            400,
            "prompt replaces the request (gsopt's --prompt); drop language or word "
            "timestamps, or say them in the prompt",
            param="prompt",
        )
    params = Params(task, prompt, language, response_format, tuple(granularities), stream)
    return files[0], params


def read_upload(data: bytes, filename: str) -> Recording:
    """The upload's audio, refused in one line (400) when it is not audio libsndfile reads,
    is empty or too short, or is longer than the 600 s cap (checked from its header first)."""
    if not data:
        raise ApiError(400, f"{filename}: the file is empty", param="file", code="empty_file")
    with tempfile.NamedTemporaryFile(suffix=Path(filename).suffix[:16]) as handle:
        handle.write(data)
        handle.flush()
        try:
            seconds = check_audio_file(handle.name)
            if seconds > MAX_AUDIO_SECONDS:
                raise ApiError(
                    400,
                    f"{filename}: {seconds:.0f} s of audio is over this server's "
                    f"{MAX_AUDIO_SECONDS:.0f} s cap; cut it into shorter files",
                    param="file",
                    code="audio_too_long",
                )
            return read_recording(handle.name, MAX_AUDIO_SECONDS)
        except GsoptError as error:
            message = str(error).replace(handle.name, filename)
            raise ApiError(400, message, param="file", code="invalid_audio") from None


def _ask(params: Params) -> Ask:
    if params.task == "translate":
        return Ask(task="translate", language=params.language, target_language="en")
    mode = "word_timestamps" if "word" in params.granularities else "default"
    return Ask(language=params.language, prompt_mode=mode)


def _stable(tokenizer, tokens: list[int]) -> str:
    """The part of a window's text so far that later tokens will not change: all but the
    last token, without a trailing incomplete character."""
    return decode(tokenizer, tokens[:-1]).rstrip("\ufffd")


def _render(result: dict[str, Any], params: Params) -> Response:
    fmt = params.response_format
    if fmt == "json":
        return JSONResponse({"text": result["text"]})
    if fmt == "text":
        return PlainTextResponse(result["text"])
    if fmt in ("srt", "vtt"):
        return PlainTextResponse(writers.render(result, fmt))
    body: dict[str, Any] = {
        "task": "transcribe" if params.task == "transcribe" else "translate",
        "language": result["language"],
        "duration": result["duration"],
        "text": result["text"],
    }
    if not params.granularities or "segment" in params.granularities:
        body["segments"] = [
            {
                "id": s["id"],
                "seek": round(s["start"] * 100),
                "start": s["start"],
                "end": s["end"],
                "text": s["text"],
                "tokens": s["tokens"],
                "temperature": 0.0,
            }
            for s in result["segments"]
        ]
    if "word" in params.granularities:
        body["words"] = result.get("words", [])
    return JSONResponse(body)


class Transcription:
    """One request through the service: checked, windowed, queued, waited for."""

    def __init__(self, service: Service, request: Request, params: Params, endpoint: str):
        self.service, self.request, self.params, self.endpoint = service, request, params, endpoint
        self.started = time.perf_counter()
        self.job: Job | None = None
        self.waited: float | None = None

    async def submit(self, upload: UploadFile) -> None:
        service, params = self.service, self.params
        data = await upload.read(MAX_UPLOAD_BYTES + 1)
        filename = Path(upload.filename or "audio").name
        if len(data) > MAX_UPLOAD_BYTES:
            raise _too_large()
        self.recording = await asyncio.to_thread(read_upload, data, filename)
        self.ask = _ask(params)
        try:
            template = list(service.template(self.ask, params.prompt))
        except GsoptError as error:
            raise ApiError(400, str(error), param="prompt") from None
        planned = await asyncio.to_thread(service.plan, self.recording)
        scheduler = service.scheduler
        sequences = [
            Sequence(self.recording.span(w.start, w.end), template, budget, group=self)
            for w, budget in planned
        ]
        self.pieces = [Piece(0, i, w) for i, (w, _) in enumerate(planned)]
        for seq in sequences:
            if scheduler.needed_positions(seq) > scheduler.positions:
                raise ApiError(
                    400,
                    f"the prompt is too long: a window, its prompt and {seq.max_new_tokens} new "
                    f"tokens need {scheduler.needed_positions(seq)} positions, a slot holds "
                    f"{scheduler.positions}",
                    param="prompt",
                )
        queued = scheduler.queued
        if queued and queued + len(sequences) > service.options.max_queue:
            raise ApiError(
                429,
                f"the queue is full ({queued} windows waiting, --max-queue "
                f"{service.options.max_queue}); retry later",
                code="queue_full",
                headers={"Retry-After": str(service.retry_after())},
            )
        if service.draining:
            raise _draining()
        self.job = Job(asyncio.get_running_loop(), sequences)
        for seq in sequences:
            scheduler.submit(seq)

    def cancel(self) -> None:
        if self.job is not None:
            for seq in self.job.sequences:
                self.service.scheduler.cancel(seq)

    async def wait_change(self) -> None:
        """Until the job changes; raises ClientGone or a 504 ApiError, cancelling it."""
        job, timeout = self.job, self.service.options.request_timeout
        job.changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(job.changed.wait(), POLL_SECONDS)
        if job.first_admitted is not None and self.waited is None:
            self.waited = max(0.0, job.first_admitted - self.started)
            self.service.metrics.queue_wait.observe(self.waited)
        if not job.done and await self.request.is_disconnected():
            self.cancel()
            raise ClientGone()
        if not job.done and timeout is not None and time.perf_counter() - self.started > timeout:
            self.cancel()
            raise ApiError(
                504,
                f"the request took longer than --request-timeout {timeout:g} s; it was cancelled",
                code="timeout",
            )

    def result(self) -> dict[str, Any]:
        error = self.job.failure()
        if error is not None:
            first = (str(error).splitlines() or [""])[0]
            raise ApiError(
                500, f"transcription failed: {type(error).__name__}: {first}", code="engine_error"
            )
        tokenizer = self.service.transcriber.tokenizer
        done = {
            piece: (decode(tokenizer, seq.tokens), seq.tokens)
            for piece, seq in zip(self.pieces, self.job.sequences, strict=True)
        }
        language = self.ask.language or self.ask.target_language
        return _result(
            self.recording, self.pieces, done, self.service.cut, language, self.ask.prompt_mode
        )

    async def answer(self) -> Response:
        while not self.job.done:
            await self.wait_change()
        return _render(self.result(), self.params)

    async def events(self) -> AsyncIterator[str]:
        """Server-sent events: text deltas in time order, then the whole text."""
        tokenizer = self.service.transcriber.tokenizer
        sent = ""
        try:
            while True:
                target = self._text_so_far(tokenizer)
                if target.startswith(sent) and len(target) > len(sent):
                    yield _event({"type": "transcript.text.delta", "delta": target[len(sent) :]})
                    sent = target
                if self.job.done:
                    break
                await self.wait_change()
            text = self.result()["text"]
            if text.startswith(sent) and len(text) > len(sent):
                yield _event({"type": "transcript.text.delta", "delta": text[len(sent) :]})
            elif not text.startswith(sent):
                log.warning("a stream's deltas differ from its text (the tokenizer re-spaced it)")
            yield _event({"type": "transcript.text.done", "text": text})
            self.finish(200)
        except (ClientGone, asyncio.CancelledError):
            self.finish(499)
            raise
        except ApiError as error:
            self.finish(error.status)
            yield _event(json.loads(error.response().body), "error")
        finally:
            self.cancel()

    def _text_so_far(self, tokenizer) -> str:
        """The finished windows' texts in time order, then the stable part of the first
        window still running."""
        parts = []
        for seq in self.job.sequences:
            if seq.finished:
                parts.append(decode(tokenizer, seq.tokens))
                continue
            parts.append(_stable(tokenizer, seq.tokens))
            break
        return " ".join(p for p in parts if p)

    def finish(self, status: int) -> None:
        metrics = self.service.metrics
        metrics.count(self.endpoint, status)
        if status == 200:
            metrics.latency.labels(self.endpoint).observe(time.perf_counter() - self.started)


def _event(data: dict[str, Any], name: str | None = None) -> str:
    head = f"event: {name}\n" if name else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _too_large() -> ApiError:
    return ApiError(
        413,
        f"the upload is over this server's {MAX_UPLOAD_BYTES // 2**20} MB cap",
        param="file",
        code="file_too_large",
    )


def _draining() -> ApiError:
    return ApiError(503, "the server is shutting down", code="shutting_down")


class BearerAuth:
    """`Authorization: Bearer KEY` on /v1/, as plain ASGI middleware (Starlette's
    BaseHTTPMiddleware would hide a client's disconnect from the handlers)."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            headers = dict(scope["headers"])
            scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), self.key):
                refusal = ApiError(
                    401,
                    "a valid API key is required (Authorization: Bearer KEY)",
                    code="invalid_api_key",
                )
                await refusal.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(service: Service) -> FastAPI:
    """The HTTP face of a started service."""
    app = FastAPI(title="gsopt", docs_url=None, redoc_url=None, openapi_url=None)
    key = service.options.api_key

    @app.exception_handler(ApiError)
    async def api_error(_: Request, error: ApiError) -> JSONResponse:
        return error.response()

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, error: HTTPException) -> JSONResponse:
        return ApiError(error.status_code, str(error.detail)).response()

    if key is not None:
        app.add_middleware(BearerAuth, key=key)

    async def transcribe(request: Request, task: str, endpoint: str) -> Response:
        job = None
        try:
            if service.draining:
                raise _draining()
            length = request.headers.get("content-length")
            if (
                length is not None
                and length.isdigit()
                and int(length) > MAX_UPLOAD_BYTES + FORM_OVERHEAD_BYTES
            ):
                raise _too_large()
            try:
                form = await request.form(max_files=2, max_fields=32)
            except Exception as error:  # a malformed body: multipart's own parse errors
                raise ApiError(400, f"expected a multipart/form-data body ({error})") from None
            upload, params = parse_params(form, task, service)
            job = Transcription(service, request, params, endpoint)
            await job.submit(upload)
            if params.stream:
                return StreamingResponse(job.events(), media_type="text/event-stream")
            response = await job.answer()
            job.finish(200)
            return response
        except ClientGone:
            service.metrics.count(endpoint, 499)
            return Response(status_code=499)
        except ApiError as error:
            if job is not None:
                job.cancel()
            service.metrics.count(endpoint, error.status)
            return error.response()
        except Exception as error:
            if job is not None:
                job.cancel()
            log.exception("request failed")
            service.metrics.count(endpoint, 500)
            return ApiError(
                500, f"internal error: {type(error).__name__}: {error}", code="internal_error"
            ).response()

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request) -> Response:
        return await transcribe(request, "transcribe", "transcriptions")

    @app.post("/v1/audio/translations")
    async def translations(request: Request) -> Response:
        return await transcribe(request, "translate", "translations")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        entry = {
            "id": service.model_id,
            "object": "model",
            "created": service.created,
            "owned_by": "gsopt",
        }
        return {"object": "list", "data": [entry]}

    @app.get("/health")
    async def health() -> JSONResponse:
        if service.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ready", "model": service.model_id})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
