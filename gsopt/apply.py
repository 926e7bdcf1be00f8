"""`gsopt apply`: run the eager baseline and a recipe on the same inputs, check that they
agree, and report each stage's speed-up (table on stdout, report.json + report.md on disk)."""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate

from gsopt.audio import load_audio, sample_audio
from gsopt.checkpoint import load_model
from gsopt.errors import GsoptError
from gsopt.pipeline import STAGES, Pipeline, Stages
from gsopt.recipe import Recipe, apply, changes_model, load_recipe
from gsopt.runtime import DTYPES, resolve_device, resolve_dtype
from gsopt.timing import StageTimer
from gsopt.tokenizer import TOKENIZER_FILES, load_tokenizer, prompt_ids, synthetic_tokenizer


def default_model(device: torch.device) -> tuple[str, str]:
    """A real-size variant on a GPU, a size a 2-core CPU runs in seconds otherwise."""
    return ("3.3-8b", "bfloat16") if device.type == "cuda" else ("cpu-small", "float32")


def prompt_template(config, source: str | Path | None = None) -> list[int]:
    """The default transcription prompt's ids (one audio placeholder): through the checkpoint's
    own tokenizer and chat template when `source` is a folder that has one, else through
    gsopt's synthetic tokenizer, so timings see a prompt of realistic length."""
    tokenizer = synthetic_tokenizer(config)
    if source is not None and any((Path(source) / f).exists() for f in TOKENIZER_FILES):
        tokenizer = load_tokenizer(source, config)
    return prompt_ids(tokenizer, config.audio_token_id)


@dataclass
class Run:
    """Timings of one pipeline over repeated calls (the first call is kept apart: compile)."""

    tokens: torch.Tensor
    first: dict[str, float]
    steady: dict[str, float]
    decode_ms_per_token: float
    total_ms: float


def _summarise(runs: list[tuple[dict[str, list[float]], float]], tokens: torch.Tensor) -> Run:
    def per_call(times: dict[str, list[float]]) -> dict[str, float]:
        return {s: 1e3 * sum(times.get(s, [0.0])) for s in STAGES}

    steady = [per_call(t) for t, _ in runs[1:]]
    return Run(
        tokens=tokens.cpu(),
        first=per_call(runs[0][0]),
        steady={s: statistics.median(r[s] for r in steady) for s in STAGES},
        decode_ms_per_token=1e3
        * statistics.median(step for t, _ in runs[1:] for step in t.get("decode", [0.0])),
        total_ms=1e3 * statistics.median(total for _, total in runs[1:]),
    )


def measure(
    pipelines: dict[str, Pipeline], waves, template, max_new_tokens: int, repeats: int
) -> dict[str, Run]:
    """Interleaved rounds (one call of each pipeline per round), so a slow spell on the
    machine hits every pipeline alike. The first round is kept apart: it compiles."""
    runs: dict[str, list] = {name: [] for name in pipelines}
    tokens: dict[str, torch.Tensor] = {}
    for _ in range(repeats + 1):
        for name, pipeline in pipelines.items():
            timer = StageTimer(pipeline.device)
            start = time.perf_counter()
            tokens[name] = pipeline(waves, template, max_new_tokens, timer=timer)
            runs[name].append((dict(timer.times), time.perf_counter() - start))
    return {name: _summarise(runs[name], tokens[name]) for name in pipelines}


def first_divergence(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int] | None:
    """(row, token index) of the first differing greedy token, or None."""
    diff = (a != b).nonzero()
    if len(diff) == 0:
        return None
    row, col = min(diff.tolist(), key=lambda rc: (rc[1], rc[0]))
    return row, col


def stage_rows(stages: Stages, eager: Run, optimised: Run) -> list[dict[str, Any]]:
    rows = []
    for stage in STAGES:
        fn = getattr(stages, stage)
        compiled = getattr(fn, "step", fn)  # a captured decode step wraps a compiled one
        base = eager.decode_ms_per_token if stage == "decode" else eager.steady[stage]
        opt = optimised.decode_ms_per_token if stage == "decode" else optimised.steady[stage]
        rows.append(
            {
                "stage": stage,
                "eager_ms": base,
                "recipe_ms": opt,
                "speedup": base / opt if opt > 0 else float("nan"),
                "compile_s": max(0.0, (optimised.first[stage] - optimised.steady[stage]) / 1e3),
                "graphs": getattr(compiled, "graphs", 0),
                "graph_breaks": getattr(compiled, "graph_breaks", 0),
                "recompiles": getattr(compiled, "recompiles", 0),
                "cudagraph_captures": getattr(fn, "captures", 0),
                "cudagraph_skips": getattr(compiled, "cudagraph_skips", 0),
                "backend": stages.labels.get(stage, "eager"),
            }
        )
    return rows


def environment(device: torch.device) -> dict[str, str]:
    """What every recorded result names: device, versions, commit."""

    def git(*args: str) -> str:
        try:
            run = subprocess.run(
                ["git", *args],
                capture_output=True,
                text=True,
                cwd=Path(__file__).parent,
                check=False,
            )
            return run.stdout.strip()
        except OSError:
            return ""

    commit = git("rev-parse", "--short", "HEAD")
    if commit and git("status", "--porcelain", "--untracked-files=no"):
        commit += "-dirty"  # the numbers came from code that no commit holds
    import fms
    import transformers

    return {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "ibm-fms": getattr(fms, "__version__", "unknown"),
        "commit": commit or "unknown",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def write_atomic(path: Path, text: str) -> None:
    """Never leave a half-written report: write beside it, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def render_markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    table = tabulate(
        [
            [
                r["stage"],
                r["backend"],
                f"{r['eager_ms']:.2f}",
                f"{r['recipe_ms']:.2f}",
                f"{r['speedup']:.2f}x",
                f"{r['compile_s']:.1f}",
                r["graphs"],
                r["graph_breaks"],
                r["recompiles"],
                r["cudagraph_captures"],
                r["cudagraph_skips"],
            ]
            for r in report["stages"]
        ],
        headers=[
            "stage",
            "backend",
            "eager ms",
            "recipe ms",
            "speed-up",
            "compile s",
            "graphs",
            "breaks",
            "recompiles",
            "captures",
            "cudagraph skips",
        ],
        tablefmt="github",
    )
    e2e = report["end_to_end"]
    lines = [
        f"# gsopt apply: {report['recipe']['name']}",
        "",
        f"{report['recipe']['description']}",
        "",
        f"Model `{report['model']}` ({report['dtype']}), {report['audio_seconds']:.1f} s of audio,"
        f" {report['max_new_tokens']} new tokens, median of {report['repeats']} runs.",
        f"Device: {env['device']}; torch {env['torch']}, transformers {env['transformers']}, "
        f"ibm-fms {env['ibm-fms']}; commit {env['commit']}; {env['date']}.",
        "",
        table,
        "",
        "decode: ms per token; other stages: ms per call.",
        "",
        f"End to end: eager {e2e['eager_ms']:.1f} ms, recipe {e2e['recipe_ms']:.1f} ms "
        f"({e2e['speedup']:.2f}x).",
        f"Agreement: {report['agreement']}.",
    ]
    if report["notes"]:
        lines += ["", "Fallbacks on this machine:", *[f"- {n}" for n in report["notes"]]]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    recipe: Recipe = load_recipe(args.recipe)
    model_name, default_dtype = default_model(device)
    source = args.model or model_name
    dtype_name = args.dtype or default_dtype
    resolve_dtype(dtype_name, device)
    waves = [load_audio(f) for f in args.audio] if args.audio else [sample_audio()]
    model = load_model(source, device=device, dtype=DTYPES[dtype_name], lora="live")
    template = prompt_template(model.config, source)

    # A recipe that transforms the model (dtype, merged LoRA, kernels) gets its own copy, so
    # both run interleaved on the same weights; one that only wraps stages shares the model.
    recipe_model = copy.deepcopy(model) if changes_model(model, recipe) else model
    stages = apply(recipe_model, recipe)
    pipelines = {
        "eager": Pipeline(model, Stages.eager(model, "dynamic")),
        "recipe": Pipeline(recipe_model, stages),
    }
    runs = measure(pipelines, waves, template, args.max_new_tokens, args.repeats)
    eager, optimised = runs["eager"], runs["recipe"]
    divergence = first_divergence(eager.tokens, optimised.tokens)
    same_precision = (recipe.dtype or dtype_name) == "float32" and dtype_name == "float32"
    if divergence is None:
        agreement = "greedy tokens identical to eager"
    else:
        agreement = f"first divergence at row {divergence[0]}, token {divergence[1]}"
    report = {
        "recipe": recipe.to_dict(),
        "model": str(source),
        "dtype": recipe.dtype or dtype_name,
        "audio_seconds": sum(len(w) for w in waves) / 16000,
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "environment": environment(device),
        "stages": stage_rows(stages, eager, optimised),
        "end_to_end": {
            "eager_ms": eager.total_ms,
            "recipe_ms": optimised.total_ms,
            "speedup": eager.total_ms / optimised.total_ms,
        },
        "agreement": agreement,
        "tokens_identical": divergence is None,
        "notes": stages.notes,
    }
    markdown = render_markdown(report)
    out = Path(args.out)
    write_atomic(out / "report.json", json.dumps(report, indent=2) + "\n")
    write_atomic(out / "report.md", markdown)
    print(markdown, end="")
    print(f"wrote {out / 'report.json'} and {out / 'report.md'}")
    if divergence is not None and same_precision:
        raise GsoptError(f"recipe {recipe.name} changed the fp32 greedy tokens ({agreement})")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("apply", help="apply a recipe; check and time it against eager")
    parser.add_argument("--recipe", required=True, help="a built-in recipe name or a .toml path")
    parser.add_argument("--model", help="checkpoint folder or variant (default: fits the device)")
    parser.add_argument("--audio", nargs="*", default=[], help="audio files (default: sample)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", help="float32, bfloat16 or float16")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after the first")
    parser.add_argument("--out", default="gsopt-report", help="folder for report.json/.md")
    parser.set_defaults(run=run)
    return parser
