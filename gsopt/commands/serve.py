"""`gsopt serve`: an OpenAI-compatible transcription server (`gsopt.transcription.server`)
on FastAPI and uvicorn, over the continuously batched engine (`gsopt.engine.scheduler`).

Every setting is checked and the port bound before the weights are read; then the model is
loaded, one clip runs through the scheduler (so compiling happens before the first
request), and a line on stderr says the server is ready. The engine runs on this (main)
thread, uvicorn on another. SIGTERM (or Ctrl-C) stops taking connections, finishes the
requests in flight, and exits 0; a second Ctrl-C stops at once (130).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import socket
import sys
import threading

from gsopt.commands import options
from gsopt.engine.scheduler import unsupported
from gsopt.errors import GsoptError
from gsopt.model.family import family_of, is_variant
from gsopt.model.memory import check_fits
from gsopt.transcription.transcriber import DEFAULT_MAX_NEW_TOKENS, Transcriber

try:
    import uvicorn

    from gsopt.transcription.server import ServeOptions, Service, create_app
except ModuleNotFoundError as missing:
    raise GsoptError(
        f"gsopt serve needs {missing.name}: pip install 'gsopt[serve]' (FastAPI, uvicorn, "
        "python-multipart, prometheus-client)"
    ) from None

DEFAULT_RECIPE = "best"  # a server compiles once and runs for long
LOOPBACK = "127.0.0.1"


def add_parser(subparsers, name: str, help: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name,
        help=help,
        description="Serve OpenAI's audio API (POST /v1/audio/transcriptions and "
        "/v1/audio/translations, GET /v1/models, /health, /metrics) with continuous batching.",
    )
    options.add_model(parser)
    options.add_recipe(parser, default=DEFAULT_RECIPE)
    options.add_device(parser)
    parser.add_argument("--host", default=LOOPBACK, help="address to bind")
    parser.add_argument("--port", type=int, default=8000, help="port to bind (0: any free one)")
    parser.add_argument(
        "--max-batch",
        type=int,
        default=16,
        metavar="S",
        help="slots in the continuous batch: windows decoded at once",
    )
    parser.add_argument(
        "--api-key",
        metavar="KEY",
        default=os.environ.get("GSOPT_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1/ (default: $GSOPT_API_KEY); "
        "without a key the server binds to localhost only",
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        metavar="S",
        help="answer 504 to a request not done after S seconds, cancelling it (default: none)",
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=256,
        metavar="N",
        help="windows (30 s each at most) that may wait for a slot; past it 429 with Retry-After",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        metavar="N",
        help=f"most tokens per file of up to 30 s (default {DEFAULT_MAX_NEW_TOKENS}); per window "
        "of a longer file (default 200 per 30 s, scaled)",
    )
    options.add_memory_check(parser)
    parser.set_defaults(run=run)
    return parser


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound now so a taken port fails before the model loads."""
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as error:
        raise GsoptError(f"--host {host!r}: cannot resolve it ({error.strerror})") from None
    sock = socket.socket(info[0], socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(info[4])
    except OSError as error:
        sock.close()
        raise GsoptError(f"--host {host} --port {port}: cannot bind ({error.strerror})") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _check(args: argparse.Namespace) -> None:
    if not 0 <= args.port <= 65535:
        raise GsoptError(f"--port must be 0-65535, got {args.port}")
    options.at_least("--max-batch", args.max_batch, 1)
    options.at_least("--max-queue", args.max_queue, 1)
    if args.max_new_tokens is not None:
        options.at_least("--max-new-tokens", args.max_new_tokens, 1)
    if args.request_timeout is not None and not args.request_timeout > 0:
        raise GsoptError(f"--request-timeout must be above 0 seconds, got {args.request_timeout}")
    if args.api_key is not None and not args.api_key.strip():
        raise GsoptError("--api-key: empty; give a key or leave the option out")


def run(args: argparse.Namespace) -> int:
    recipe = options.one_recipe(args.recipe, "serve", default=DEFAULT_RECIPE)
    _check(args)
    transcriber = Transcriber(
        args.model,
        recipe=recipe,
        device=args.device,
        dtype=args.dtype,
        max_new_tokens=args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
        memory_check=args.memory_check,
    )
    settings = transcriber.recipe.for_device(transcriber.device.type)
    reason = unsupported(
        speculates=settings.speculate is not None,
        num_beams=settings.num_beams,
        static_cache=settings.kv_cache == "static",
        decoder=family_of(transcriber.config).decoder,
    )
    if reason:
        raise GsoptError(f"recipe {transcriber.recipe.name}: {reason}")
    host = args.host
    if args.api_key is None and not _loopback(host):
        print(
            f"gsopt serve: warning: no --api-key, so binding {LOOPBACK} instead of {host}; "
            "give --api-key KEY (or $GSOPT_API_KEY) to serve other machines",
            file=sys.stderr,
        )
        host = LOOPBACK
    sock = _bind(host, args.port)
    if args.memory_check:
        check_fits(
            transcriber.source,
            transcriber.config,
            transcriber.dtype,
            transcriber.device,
            1,
            args.max_batch,
        )
    return _serve(args, transcriber, sock)


def _serve(args: argparse.Namespace, transcriber: Transcriber, sock: socket.socket) -> int:
    name = transcriber.recipe.name
    default = " (the default)" if args.recipe is None else ""
    print(
        f"gsopt serve: loading {transcriber.source} with recipe {name}{default}; compiling "
        "runs before the server is ready (on a CPU this can take a minute)",
        file=sys.stderr,
    )
    if is_variant(transcriber.source):
        print(
            f"gsopt serve: note: {str(transcriber.source)!r} is a variant with random weights, "
            "so the text is gibberish; pass --model DIR for a real checkpoint",
            file=sys.stderr,
        )
    transcriber.load()
    service = Service(
        transcriber,
        ServeOptions(
            max_batch=args.max_batch,
            api_key=args.api_key,
            request_timeout=args.request_timeout,
            max_queue=args.max_queue,
            max_new_tokens=args.max_new_tokens,
        ),
    )
    service.warm_up()
    config = uvicorn.Config(
        create_app(service),
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=None,
    )
    server = uvicorn.Server(config)  # on a thread of its own: signals come here
    stop = threading.Event()

    def http() -> None:
        try:
            server.run(sockets=[sock])
        finally:  # every connection answered: the engine may stop once idle
            stop.set()
            service.scheduler.wake()

    def on_signal(sig: int, _) -> None:
        if service.draining and sig == signal.SIGINT:  # a second Ctrl-C: now
            server.force_exit = True
            raise KeyboardInterrupt
        service.draining = True
        server.should_exit = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    thread = threading.Thread(target=http, name="gsopt-http", daemon=True)
    thread.start()
    bound, port = sock.getsockname()[:2]
    print(
        f"gsopt serve: ready: {service.model_id} on http://{bound}:{port} (recipe {name}, "
        f"{args.max_batch} slots{', API key required' if args.api_key else ''})",
        file=sys.stderr,
        flush=True,
    )
    # The engine runs on this thread, the one that loaded the model: torch on a second
    # thread would start a second OpenMP team, and two teams on a few cores stop
    # spin-waiting (batched steps 2.5x slower on 2 cores).
    service.scheduler.run(stop)
    thread.join()
    print("gsopt serve: stopped", file=sys.stderr)
    return 0
