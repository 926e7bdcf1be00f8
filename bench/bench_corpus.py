"""Corpus-run benchmarks on a synthetic corpus (tiny model, CPU by default).

1. Batching: the same clips in batches of the same size, in input order and sorted by
   duration (what `transcribe --manifest` does), timed in one process, interleaved.
2. Processes: `gsopt transcribe --manifest` in one process against torchrun with N
   processes, whole commands timed (imports and model load included) beside the RTFx each
   reports for transcription alone.

    python bench/bench_corpus.py --clips 200 --out bench/results/corpus-cpu-tiny
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile
import torch

from gsopt.audio.files import load_audio
from gsopt.results import environment, to_json, write_atomic
from gsopt.transcription import corpus
from gsopt.transcription.transcriber import Transcriber


def write_corpus(folder: Path, clips: int, low: float, high: float, seed: int) -> Path:
    """`clips` files of uniform random length in [low, high] s: a tone over noise at 16 kHz."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(clips):
        seconds = rng.uniform(low, high)
        t = np.arange(round(seconds * 16000)) / 16000
        wave = 0.2 * np.sin(2 * np.pi * rng.uniform(100, 400) * t) + 0.02 * rng.standard_normal(
            t.size
        )
        name = f"clip{i:04d}.wav"
        soundfile.write(folder / name, wave.astype(np.float32), 16000)
        rows.append({"audio": name, "id": f"c{i:04d}"})
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def batching(manifest: Path, model: str, batch: int, tokens: int, rounds: int) -> dict:
    entries = corpus.read_manifest(manifest)
    waves = {e.id: load_audio(e.audio) for e in entries}
    transcriber = Transcriber(model, device="cpu", max_new_tokens=tokens)
    transcriber.load()
    orders = {
        "input order": entries,
        "duration sorted": sorted(entries, key=lambda e: (-len(waves[e.id]), e.index)),
    }
    audio = sum(len(w) for w in waves.values()) / 16000
    times: dict[str, list[float]] = {name: [] for name in orders}
    padded: dict[str, float] = {}
    for _ in range(rounds):
        for name, order in orders.items():
            groups = [order[i : i + batch] for i in range(0, len(order), batch)]
            padded[name] = sum(len(g) * max(len(waves[e.id]) for e in g) for g in groups) / 16000
            start = time.perf_counter()
            for index, group in enumerate(groups):
                transcriber.run_batch(index, [e.audio for e in group], [waves[e.id] for e in group])
            times[name].append(time.perf_counter() - start)
    rows = []
    for name in orders:
        seconds = statistics.median(times[name])
        rows.append(
            {
                "order": name,
                "batch_size": batch,
                "seconds_median": seconds,
                "seconds_all": times[name],
                "rtfx": audio / seconds,
                "padding_fraction": 1 - audio / padded[name],
            }
        )
    return {"audio_seconds": audio, "max_new_tokens": tokens, "rounds": rounds, "rows": rows}


def processes(manifest: Path, model: str, batch: int, tokens: int, nprocs: list[int]) -> list:
    rows = []
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    for n in nprocs:
        out = manifest.parent / f"out-{n}.jsonl"
        out.unlink(missing_ok=True)
        command = ["-m", "gsopt", "transcribe", "--manifest", str(manifest), "--out", str(out)]
        command += ["--model", model, "--max-new-tokens", str(tokens), "--batch-size", str(batch)]
        command += ["--quiet"]
        launcher = [sys.executable]
        if n > 1:
            launcher += ["-m", "torch.distributed.run", "--nproc-per-node", str(n)]
        start = time.perf_counter()
        run = subprocess.run([*launcher, *command], env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if run.returncode != 0:
            raise SystemExit(f"{n} process(es) failed:\n{run.stderr[-3000:]}")
        rtfx = re.search(r"RTFx ([\d.]+)", run.stderr)
        rows.append(
            {
                "processes": n,
                "threads_per_process": torch.get_num_threads() if n == 1 else 1,
                "command_seconds": wall,
                "rank0_transcription_rtfx": float(rtfx.group(1)) if rtfx else None,
                "lines": len(out.read_text().splitlines()),
            }
        )
    return rows


def markdown(result: dict) -> str:
    env = result["environment"]
    b = result["batching"]
    lines = [
        f"# Corpus runs: {result['clips']} clips of {result['seconds']} s, `{result['model']}`",
        "",
        f"{env['device']}; torch {env['torch']}, transformers {env['transformers']}, ibm-fms "
        f"{env['ibm-fms']}; commit {env['commit']}; {env['date']}.",
        "",
        f"## Batching ({b['audio_seconds']:.0f} s of audio, batch {b['rows'][0]['batch_size']}, "
        f"{b['max_new_tokens']} new tokens, median of {b['rounds']} interleaved rounds)",
        "",
        "| order | seconds | RTFx | padding |",
        "|---|---|---|---|",
        *(
            f"| {r['order']} | {r['seconds_median']:.1f} | {r['rtfx']:.1f} | "
            f"{100 * r['padding_fraction']:.1f}% |"
            for r in b["rows"]
        ),
        "",
        "## Processes (whole commands, imports and model load included)",
        "",
        "| processes | threads each | command seconds | rank 0 transcription RTFx |",
        "|---|---|---|---|",
        *(
            f"| {r['processes']} | {r['threads_per_process']} | {r['command_seconds']:.1f} | "
            f"{r['rank0_transcription_rtfx']} |"
            for r in result["processes"]
        ),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=200)
    parser.add_argument("--seconds", default="1,20", help="shortest,longest clip")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--processes", default="1,2")
    parser.add_argument("--out", default="bench/results/corpus-cpu-tiny")
    args = parser.parse_args()
    low, high = map(float, args.seconds.split(","))
    with tempfile.TemporaryDirectory() as folder:
        manifest = write_corpus(Path(folder), args.clips, low, high, seed=0)
        result = {
            "clips": args.clips,
            "seconds": args.seconds,
            "model": args.model,
            "environment": environment(torch.device("cpu")),
            "batching": batching(
                manifest, args.model, args.batch_size, args.max_new_tokens, args.rounds
            ),
            "processes": processes(
                manifest,
                args.model,
                args.batch_size,
                args.max_new_tokens,
                [int(n) for n in args.processes.split(",")],
            ),
        }
    out = Path(args.out)
    write_atomic(out.with_suffix(".json"), to_json(result))
    write_atomic(out.with_suffix(".md"), markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
