"""Long recordings on one engine: batched windows against the same windows one at a time,
fixed against VAD windows, how the cost grows with duration, and peak memory for hours.

The recording is synthetic: the bundled speech sample and its pieces, separated by random
pauses of 0.3-2.5 s, to the length asked (a seeded generator, so runs compare). Random
weights make the text gibberish; the work per window is a real model's.

    python bench/bench_longform.py --model tiny --recipe best --minutes 1,10,60 \\
        --compare-minutes 10 --memory-hours 1,4 --out bench/results/longform-tiny
    python bench/bench_longform.py --model cpu-small --recipe best --minutes 1,10,60 \\
        --compare-minutes 10 --memory-hours 1 --out bench/results/longform-cpu-small

Writes OUT.json and OUT.md (environment, device ISA and commit included) and OUT.png.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile

from gsopt.audio.files import sample_audio
from gsopt.results import environment, to_json, write_atomic
from gsopt.transcription.longform import LongForm
from gsopt.transcription.transcriber import Transcriber

RATE = 16000


def synthetic(seconds: float, seed: int = 0) -> np.ndarray:
    """Speech pieces (the sample, whole or cut) between pauses, `seconds` long, as int16."""
    rng = np.random.default_rng(seed)
    speech = sample_audio().numpy()
    out = np.zeros(round(seconds * RATE), dtype=np.int16)
    at = 0
    while at < len(out):
        start = int(rng.integers(0, len(speech) // 2))
        piece = speech[start : start + int(rng.integers(RATE, len(speech) - start + 1))]
        piece = np.clip(np.rint(piece * 32767), -32768, 32767).astype(np.int16)
        piece = piece[: len(out) - at]
        out[at : at + len(piece)] = piece
        at += len(piece) + int(rng.uniform(0.3, 2.5) * RATE)
    return out


def write_recording(folder: Path, minutes: float) -> Path:
    path = folder / f"synthetic-{minutes:g}min.wav"
    if not path.exists():
        soundfile.write(path, synthetic(60 * minutes), RATE, subtype="PCM_16")
    return path


def timed(transcriber: Transcriber, path: Path, cut: LongForm, batch_size: int) -> dict:
    start = time.perf_counter()
    result = transcriber.transcribe(path, cut, batch_size=batch_size, batch_seconds=1e9)
    seconds = time.perf_counter() - start
    return {
        "windows": len(result["segments"]),
        "wall_s": seconds,
        "audio_s": result["duration"],
        "rtfx": result["duration"] / seconds,
        "warnings": len(result["warnings"]),
    }


MEMORY = """
import sys
from gsopt.transcription.longform import LongForm
from gsopt.transcription.transcriber import Transcriber

def status(field):
    line = next(l for l in open("/proc/self/status") if l.startswith(field))
    return int(line.split()[1]) * 1024

t = Transcriber(sys.argv[1], recipe=sys.argv[5], max_new_tokens=8)
t.load()
t.transcribe(sys.argv[4], LongForm(segmentation=sys.argv[3], max_new_tokens=8), batch_size=16)
resident = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # the peak from here on
t.transcribe(sys.argv[2], LongForm(segmentation=sys.argv[3], max_new_tokens=8), batch_size=16)
print(resident, status("VmHWM:"))
"""


def peak_memory(model: str, path: Path, segmentation: str, warm: Path, recipe: str) -> dict:
    """Peak RSS (Linux's VmHWM, reset once the model is loaded and warm) of a fresh process
    transcribing the file, above what it held before (a budget of 8 tokens a window: memory,
    not decoding, is measured)."""
    done = subprocess.run(
        [sys.executable, "-c", MEMORY, model, str(path), segmentation, str(warm), recipe],
        capture_output=True,
        text=True,
        check=True,
    )
    resident, peak = map(int, done.stdout.split()[-2:])
    mb = 2**20
    return {"loaded_mb": resident / mb, "peak_mb": peak / mb, "above_mb": (peak - resident) / mb}


def markdown(data: dict) -> str:
    env = data["environment"]
    lines = [
        f"# Long recordings on `{data['model']}`, recipe `{data['recipe']}`",
        "",
        f"{env['device']}; torch {env['torch']}, transformers {env['transformers']}; commit "
        f"{env['commit']}; {env['date']}. Synthetic speech with pauses, random weights, "
        "fixed 30 s windows unless named; 200 tokens per 30 s.",
        "",
        "| comparison | windows | audio s | wall s | RTFx |",
        "|---|---|---|---|---|",
    ]
    for name, row in data["runs"].items():
        lines.append(
            f"| {name} | {row['windows']} | {row['audio_s']:.0f} | {row['wall_s']:.1f} | "
            f"{row['rtfx']:.1f} |"
        )
    if data.get("batched_over_alone"):
        lines += ["", f"Batched windows over one at a time: {data['batched_over_alone']:.2f}x."]
    if data["memory"]:
        lines += [
            "",
            "Peak memory (VmHWM) while transcribing, above the warm process's resident set:",
            "",
            "| recording | segmentation | resident MB | peak MB | above MB |",
        ]
        lines += ["|---|---|---|---|---|"]
        for row in data["memory"]:
            lines.append(
                f"| {row['hours']:g} h | {row['segmentation']} | {row['loaded_mb']:.0f} | "
                f"{row['peak_mb']:.0f} | {row['above_mb']:.0f} |"
            )
    return "\n".join(lines) + "\n"


def chart(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scaling = sorted(
        (row["audio_s"] / 60, row["wall_s"])
        for name, row in data["runs"].items()
        if name.startswith("fixed, batched, ")
    )
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([m for m, _ in scaling], [s for _, s in scaling], "o-", label="fixed windows, batched")
    ax.set_xlabel("recording, minutes")
    ax.set_ylabel("wall seconds")
    ax.set_title(f"Cost against duration ({data['model']})")
    ax.legend()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--recipe", default="best")
    parser.add_argument("--minutes", default="1,10,60", help="durations for the scaling runs")
    parser.add_argument("--compare-minutes", type=float, default=10.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--memory-hours", default="1,4")
    parser.add_argument("--out", type=Path, required=True, help="OUT.json/.md/.png are written")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="gsopt-longform-"))
    transcriber = Transcriber(args.model, recipe=args.recipe)
    transcriber.load()
    warm = write_recording(folder, 2)  # first calls of each batch shape build their caches
    for batch_size in (args.batch_size, 1):
        timed(transcriber, warm, LongForm(), batch_size)
        timed(transcriber, warm, LongForm(segmentation="vad"), batch_size)
    runs = {}
    for minutes in [float(m) for m in args.minutes.split(",")]:
        path = write_recording(folder, minutes)
        runs[f"fixed, batched, {minutes:g} min"] = timed(
            transcriber, path, LongForm(), args.batch_size
        )
        print(f"{minutes:g} min: {runs[f'fixed, batched, {minutes:g} min']}", file=sys.stderr)
    path = write_recording(folder, args.compare_minutes)
    m = f"{args.compare_minutes:g} min"
    runs[f"fixed, one at a time, {m}"] = timed(transcriber, path, LongForm(), 1)
    runs[f"fixed, batched, {m} (again)"] = timed(transcriber, path, LongForm(), args.batch_size)
    runs[f"vad, batched, {m}"] = timed(
        transcriber, path, LongForm(segmentation="vad"), args.batch_size
    )
    batched = runs[f"fixed, batched, {m} (again)"]["wall_s"]
    alone = runs[f"fixed, one at a time, {m}"]["wall_s"]
    memory = []
    for hours in [float(h) for h in args.memory_hours.split(",") if h]:
        path = write_recording(folder, 60 * hours)
        for segmentation in ("fixed", "vad"):
            memory.append(
                {"hours": hours, "segmentation": segmentation}
                | peak_memory(args.model, path, segmentation, warm, args.recipe)
            )
            print(f"memory {hours:g} h {segmentation}: {memory[-1]}", file=sys.stderr)
    import torch

    data = {
        "model": args.model,
        "recipe": args.recipe,
        "environment": environment(torch.device("cpu")),
        "batch_size": args.batch_size,
        "runs": runs,
        "batched_over_alone": alone / batched,
        "memory": memory,
        "self_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    write_atomic(args.out.with_suffix(".json"), to_json(data))
    write_atomic(args.out.with_suffix(".md"), markdown(data))
    chart(data, args.out.with_suffix(".png"))
    print(json.dumps({k: v for k, v in data.items() if k != "environment"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
