"""Serving under load: continuous batching against static batches and one request at a time.

Three engines over the same loaded model and recipe:
- `continuous`: `gsopt.engine.scheduler.Scheduler` with S slots (what `gsopt serve` runs);
- `static`: when the engine is free it takes what is waiting (FIFO, up to S) as one padded
  batch and runs it to its end; every request of the batch finishes with its longest row;
- `single`: one request at a time (static with S = 1).

Requests are clips of mixed lengths (2.5, 5, 5, 10 and 20 s, drawn at random: the bundled
speech sample tiled). Random weights never say end-of-text, so each request is given the
token budget a real transcript of its length needs (3 tokens per second of audio, about
2.5 words per second); the work per request is a real model's.

Measured, each in a fresh run of every engine:
1. unloaded latency of each clip length, alone (median of 3);
2. closed loop: C clients (16), each sending its next request when the last is answered:
   throughput (audio seconds per second) and latency percentiles. The continuous engine's
   request rate here is the saturation rate;
3. open loop: Poisson arrivals at fractions of the saturation rate: throughput against
   offered load (the saturation curve) and latency p50/p95/p99, and the p95 latency of the
   5 s clips against their unloaded latency.
Engine-level: no HTTP, so the three engines differ in batching alone.

    python bench/bench_serve.py --model tiny --out bench/results/serve-tiny
    python bench/bench_serve.py --model cpu-small --requests 32 --out bench/results/serve-cpu-small

Writes OUT.json, OUT.md (environment, device ISA and commit included) and OUT.png.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from gsopt.audio.files import sample_audio
from gsopt.audio.frontend import SAMPLE_RATE
from gsopt.engine.scheduler import Scheduler, Sequence
from gsopt.results import environment, to_json, write_atomic
from gsopt.transcription.batching import plan_batches
from gsopt.transcription.transcriber import Transcriber

LENGTHS = (2.5, 5.0, 5.0, 10.0, 20.0)  # seconds; 5 s twice as likely (the latency probe)
PROBE = 5.0
ENGINES = ("continuous", "static", "single")


@dataclass(eq=False)
class Request:
    seconds: float
    budget: int
    wave: torch.Tensor
    arrival: float = 0.0
    finish: float = 0.0
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def latency(self) -> float:
        return self.finish - self.arrival


def clip(seconds: float) -> torch.Tensor:
    speech = sample_audio()
    n = round(seconds * SAMPLE_RATE)
    return speech.repeat(n // len(speech) + 1)[:n].clone()


def workload(n: int, seed: int, tokens_per_second: float) -> list[Request]:
    rng = np.random.default_rng(seed)
    waves = {s: clip(s) for s in set(LENGTHS)}
    out = []
    for _ in range(n):
        seconds = float(rng.choice(LENGTHS))
        budget = math.ceil(tokens_per_second * seconds)
        out.append(Request(seconds, budget, waves[seconds]))
    return out


class Continuous:
    """The scheduler, as `gsopt serve` runs it."""

    def __init__(self, transcriber: Transcriber, slots: int):
        self.template = transcriber.template
        self.scheduler = Scheduler(transcriber.pipeline, slots)
        self.stopping = threading.Event()

    def submit(self, request: Request) -> None:
        def finished(seq: Sequence, _: list[int]) -> None:
            if seq.finished:
                request.finish = time.perf_counter()
                request.done.set()

        request.arrival = time.perf_counter()
        seq = Sequence(request.wave, self.template, request.budget, listener=finished)
        self.scheduler.submit(seq)

    def serve(self) -> None:
        self.scheduler.run(self.stopping)

    def stop(self) -> None:
        self.stopping.set()
        self.scheduler.wake()


class Static:
    """Padded batches of what is waiting (FIFO, up to `batch`), each run to its end."""

    def __init__(self, transcriber: Transcriber, batch: int):
        self.pipeline, self.template, self.batch = transcriber.pipeline, transcriber.template, batch
        self.waiting: deque[Request] = deque()
        self.lock = threading.Condition()
        self.stopping = False

    def submit(self, request: Request) -> None:
        with self.lock:
            request.arrival = time.perf_counter()
            self.waiting.append(request)
            self.lock.notify()

    def serve(self) -> None:
        while True:
            with self.lock:
                while not self.waiting and not self.stopping:
                    self.lock.wait()
                if not self.waiting:
                    return
                batch = [self.waiting.popleft() for _ in range(min(self.batch, len(self.waiting)))]
            budget = max(r.budget for r in batch)
            self.pipeline([r.wave for r in batch], self.template, budget, stop_at_eos=True)
            now = time.perf_counter()
            for request in batch:
                request.finish = now
                request.done.set()

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            self.lock.notify()


def engine(name: str, transcriber: Transcriber, slots: int):
    if name == "continuous":
        return Continuous(transcriber, slots)
    return Static(transcriber, slots if name == "static" else 1)


def drive(runner, clients) -> None:
    """The engine on this thread (the one that loaded the model: a second thread running
    torch would start a second OpenMP team, and two teams on two cores stop spin-waiting,
    which slowed batched steps 2.5x here), `clients` on threads of their own."""
    threads = [threading.Thread(target=client, args=(runner,)) for client in clients]

    def finish() -> None:
        for thread in threads:
            thread.join()
        runner.stop()

    for thread in threads:
        thread.start()
    closer = threading.Thread(target=finish)
    closer.start()
    runner.serve()
    closer.join()


def summary(requests: list[Request], start: float) -> dict:
    latencies = sorted(r.latency for r in requests)
    probe = sorted(r.latency for r in requests if r.seconds == PROBE)
    makespan = max(r.finish for r in requests) - start
    audio = sum(r.seconds for r in requests)

    def pct(values: list[float], q: float) -> float:
        return float(np.percentile(values, q)) if values else float("nan")

    return {
        "requests": len(requests),
        "audio_s": audio,
        "wall_s": makespan,
        "throughput_audio_s_per_s": audio / makespan,
        "requests_per_s": len(requests) / makespan,
        "latency_p50_s": pct(latencies, 50),
        "latency_p95_s": pct(latencies, 95),
        "latency_p99_s": pct(latencies, 99),
        "probe_p95_s": pct(probe, 95),
        "probe_count": len(probe),
    }


def unloaded(transcriber: Transcriber, name: str, slots: int, tokens_per_second: float) -> dict:
    out: dict[str, float] = {}
    waves = {s: clip(s) for s in set(LENGTHS)}  # here: torch in a client thread slows all

    def client(runner) -> None:
        for seconds in sorted(set(LENGTHS)):
            times = []
            for _ in range(3):
                budget = math.ceil(tokens_per_second * seconds)
                request = Request(seconds, budget, waves[seconds])
                runner.submit(request)
                request.done.wait()
                times.append(request.latency)
            out[str(seconds)] = statistics.median(times)

    drive(engine(name, transcriber, slots), [client])
    return out


def closed_loop(transcriber, name, slots, clients, requests: list[Request]) -> dict:
    todo = deque(requests)
    lock = threading.Lock()

    def client(runner) -> None:
        while True:
            with lock:
                if not todo:
                    return
                request = todo.popleft()
            runner.submit(request)
            request.done.wait()

    start = time.perf_counter()
    drive(engine(name, transcriber, slots), [client] * clients)
    return summary(requests, start)


def open_loop(transcriber, name, slots, rate: float, requests: list[Request], seed: int) -> dict:
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, len(requests))
    start = time.perf_counter()

    def arrivals(runner) -> None:
        at = start
        for request, gap in zip(requests, gaps, strict=True):
            at += gap
            time.sleep(max(0.0, at - time.perf_counter()))
            runner.submit(request)
        for request in requests:
            request.done.wait()

    drive(engine(name, transcriber, slots), [arrivals])
    result = summary(requests, start)
    result["offered_requests_per_s"] = rate
    result["offered_audio_s_per_s"] = rate * statistics.mean(r.seconds for r in requests)
    return result


def corpus(transcriber, slots: int, n: int, spread: float, seed: int, rounds: int) -> dict:
    """A corpus run's question: all clips known at once, 1-20 s. Duration-sorted static
    batches (`plan_batches`, as `transcribe --manifest` cuts them, `slots` a batch, 300 s of
    padded audio at most) against the scheduler fed the same longest-first list; the two
    interleaved, `rounds` times each (medians). Each clip's transcript takes 3 tokens a
    second x a factor drawn from [1 - spread, 1 + spread] (speaking rate and pauses vary; at
    spread 0 a clip's length says its transcript's). A static batch runs to its longest row,
    as a batch of real rows that ended early does."""
    rng = np.random.default_rng(seed)
    seconds = [float(s) for s in np.sort(rng.uniform(1.0, 20.0, n))[::-1]]
    factors = rng.uniform(1 - spread, 1 + spread, n)
    items = [
        (Request(s, math.ceil(3.0 * f * s), clip(s)), s)
        for s, f in zip(seconds, factors, strict=True)
    ]
    pipeline, template = transcriber.pipeline, transcriber.template
    batches = plan_batches(items, slots, 300.0)

    def static() -> None:
        for batch in batches:
            requests = [r for r, _ in batch]
            budget = max(r.budget for r in requests)
            pipeline([r.wave for r in requests], template, budget, stop_at_eos=True)

    def continuous() -> None:
        scheduler = Scheduler(pipeline, slots)
        for request, _ in items:
            scheduler.submit(Sequence(request.wave, template, request.budget))
        scheduler.drain()

    times: dict[str, list[float]] = {"static": [], "scheduler": []}
    for _ in range(rounds):
        for name, run in (("static", static), ("scheduler", continuous)):
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    tokens = sum(r.budget for r, _ in items)
    static_steps = sum(max(r.budget for r, _ in b) * len(b) for b in batches)
    static_s, scheduler_s = (statistics.median(times[k]) for k in ("static", "scheduler"))
    return {
        "clips": n,
        "audio_s": sum(seconds),
        "spread": spread,
        "tokens": tokens,
        "static_row_steps": static_steps,
        "rounds": rounds,
        "static_s": static_s,
        "scheduler_s": scheduler_s,
        "static_rtfx": sum(seconds) / static_s,
        "scheduler_rtfx": sum(seconds) / scheduler_s,
        "scheduler_speedup": static_s / scheduler_s,
    }


def fresh(requests: list[Request]) -> list[Request]:
    return [Request(r.seconds, r.budget, r.wave) for r in requests]


def markdown(data: dict) -> str:
    env = data["environment"]
    lines = [
        f"# Serving under load: {data['model']} ({data['recipe']}, {data['slots']} slots)",
        "",
        f"{env['device']}; torch {env['torch']}, transformers {env['transformers']}, ibm-fms "
        f"{env['ibm-fms']}; commit {env['commit']}; {env['date']}.",
        "",
    ]
    if "closed" in data:
        lines += serving_markdown(data)
    if "corpus" in data:
        lines += [
            "## Corpus runs: duration-sorted static batches against the scheduler",
            "",
            "All clips known at once (1-20 s, longest first); static batches as "
            "`transcribe --manifest` plans them; each transcript 3 tokens per audio second "
            "x a per-clip factor in [1 - spread, 1 + spread].",
            "",
            "| clips | audio s | spread | tokens | static s (RTFx) | scheduler s (RTFx) | "
            "scheduler speed-up |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in data["corpus"]:
            lines.append(
                f"| {r['clips']} | {r['audio_s']:.0f} | {r['spread']:g} | {r['tokens']} | "
                f"{r['static_s']:.2f} ({r['static_rtfx']:.0f}) | {r['scheduler_s']:.2f} "
                f"({r['scheduler_rtfx']:.0f}) | {r['scheduler_speedup']:.2f}x |"
            )
        lines.append("")
    return "\n".join(lines)


def serving_markdown(data: dict) -> list[str]:
    lines = [
        f"Clips of {', '.join(f'{s:g}' for s in sorted(set(LENGTHS)))} s (5 s twice as likely), "
        f"{data['tokens_per_second']:g} tokens per audio second each; engine-level (no HTTP).",
        "",
        "## Unloaded latency (s, median of 3)",
        "",
        "| engine | " + " | ".join(f"{s} s clip" for s in data["unloaded"]["continuous"]) + " |",
        "|---|" + "---:|" * len(data["unloaded"]["continuous"]),
    ]
    for name, row in data["unloaded"].items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in row.values()) + " |")
    lines += [
        "",
        f"## Closed loop: {data['clients']} concurrent clients, {data['requests']} requests",
        "",
        "| engine | audio s/s | x single | req/s | p50 s | p95 s | p99 s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    single = data["closed"]["single"]["throughput_audio_s_per_s"]
    for name, r in data["closed"].items():
        lines.append(
            f"| {name} | {r['throughput_audio_s_per_s']:.2f} | "
            f"{r['throughput_audio_s_per_s'] / single:.2f} | {r['requests_per_s']:.3f} | "
            f"{r['latency_p50_s']:.2f} | {r['latency_p95_s']:.2f} | {r['latency_p99_s']:.2f} |"
        )
    lines += [
        "",
        "## Open loop: Poisson arrivals (saturation curve)",
        "",
        f"Saturation rate: {data['saturation_requests_per_s']:.3f} requests/s (the continuous "
        "engine's closed-loop rate).",
        "",
        "| engine | load x sat | offered audio s/s | served audio s/s | p50 s | p95 s | p99 s "
        "| 5 s clip p95 s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, runs in data["open"].items():
        for r in runs:
            lines.append(
                f"| {name} | {r['load']:.2f} | {r['offered_audio_s_per_s']:.2f} | "
                f"{r['throughput_audio_s_per_s']:.2f} | {r['latency_p50_s']:.2f} | "
                f"{r['latency_p95_s']:.2f} | {r['latency_p99_s']:.2f} | {r['probe_p95_s']:.2f} |"
            )
    t = data["targets"]
    lines += [
        "",
        "## Targets",
        "",
        f"- Throughput at {data['clients']} concurrent clients, continuous / single: "
        f"{t['closed_speedup']:.2f}x (target 3x): {'met' if t['closed_met'] else 'not met'}.",
        f"- p95 latency of a 5 s clip at half the saturation rate: {t['probe_p95_s']:.2f} s "
        f"against {t['probe_unloaded_s']:.2f} s unloaded, {t['probe_ratio']:.2f}x (target under "
        f"2x): {'met' if t['probe_met'] else 'not met'}.",
        "",
    ]
    return lines


def chart(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, runs in data["open"].items():
        x = [r["offered_audio_s_per_s"] for r in runs]
        left.plot(x, [r["throughput_audio_s_per_s"] for r in runs], marker="o", label=name)
        right.plot(x, [r["latency_p95_s"] for r in runs], marker="o", label=name)
    top = max(r["offered_audio_s_per_s"] for runs in data["open"].values() for r in runs)
    left.plot([0, top], [0, top], color="grey", linestyle=":", label="served = offered")
    left.set(xlabel="offered load (audio s per s)", ylabel="served (audio s per s)")
    left.set_title("Saturation curve")
    right.set(xlabel="offered load (audio s per s)", ylabel="p95 latency (s)", yscale="log")
    right.set_title("p95 latency")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
    fig.suptitle(f"{data['model']}, {data['recipe']}, {data['slots']} slots", fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def serving(args, transcriber: Transcriber, data: dict) -> None:
    loads = [float(x) for x in args.loads.split(",")]
    tps = args.tokens_per_second
    closed_work = workload(args.requests, args.seed, tps)
    for name in ENGINES:  # warm every engine and shape once
        closed_loop(transcriber, name, args.slots, args.clients, fresh(closed_work[:8]))
    data["unloaded"] = {n: unloaded(transcriber, n, args.slots, tps) for n in ENGINES}
    data["closed"], data["open"] = {}, {n: [] for n in ENGINES}
    for name in ENGINES:
        data["closed"][name] = closed_loop(
            transcriber, name, args.slots, args.clients, fresh(closed_work)
        )
        print(name, "closed", json.dumps(data["closed"][name]), flush=True)
    saturation = data["closed"]["continuous"]["requests_per_s"]
    data["saturation_requests_per_s"] = saturation
    for i, load in enumerate(loads):
        work = workload(args.requests, args.seed + 1 + i, tps)
        for name in ENGINES:
            run = open_loop(transcriber, name, args.slots, load * saturation, fresh(work), i)
            run["load"] = load
            data["open"][name].append(run)
            print(name, "open", load, json.dumps(run), flush=True)
    half = min(data["open"]["continuous"], key=lambda r: abs(r["load"] - 0.5))
    closed = data["closed"]
    speedup = (
        closed["continuous"]["throughput_audio_s_per_s"]
        / (closed["single"]["throughput_audio_s_per_s"])
    )
    probe_unloaded = data["unloaded"]["continuous"][str(PROBE)]
    data["targets"] = {
        "closed_speedup": speedup,
        "closed_met": speedup >= 3.0,
        "probe_load": half["load"],
        "probe_p95_s": half["probe_p95_s"],
        "probe_unloaded_s": probe_unloaded,
        "probe_ratio": half["probe_p95_s"] / probe_unloaded,
        "probe_met": half["probe_p95_s"] < 2 * probe_unloaded,
    }
    print(json.dumps(data["targets"], indent=1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--recipe", default="static-kv")
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=48, help="requests per loaded run")
    parser.add_argument("--loads", default="0.25,0.5,0.75,1.0,1.5", help="x saturation rate")
    parser.add_argument("--tokens-per-second", type=float, default=3.0)
    parser.add_argument("--corpus", type=int, default=0, help="clips of the corpus comparison")
    parser.add_argument("--rounds", type=int, default=3, help="corpus rounds (medians)")
    parser.add_argument("--parts", default="serving,corpus", help="serving and/or corpus")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="path without suffix")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    transcriber = Transcriber(args.model, recipe=args.recipe)
    transcriber.load()
    data = {
        "model": args.model,
        "recipe": args.recipe,
        "slots": args.slots,
        "clients": args.clients,
        "requests": args.requests,
        "tokens_per_second": args.tokens_per_second,
        "environment": environment(torch.device("cpu")),
    }
    if "serving" in parts:
        serving(args, transcriber, data)
    if "corpus" in parts and args.corpus:
        corpus(transcriber, args.slots, 16, 0.0, args.seed, 1)  # warm-up
        data["corpus"] = [
            corpus(transcriber, args.slots, args.corpus, spread, args.seed, args.rounds)
            for spread in (0.0, 0.5)
        ]
        print(json.dumps(data["corpus"], indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out.with_suffix(".json"), to_json(data))
    write_atomic(args.out.with_suffix(".md"), markdown(data))
    if "serving" in parts:
        chart(data, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
