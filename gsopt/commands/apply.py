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
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate

from gsopt.audio.files import load_audio, sample_audio
from gsopt.engine.ctc_pipeline import CTC_STAGES, CTCPipeline
from gsopt.engine.pipeline import STAGES, Pipeline, Stages
from gsopt.errors import GsoptError
from gsopt.measure.accuracy import teacher_forced
from gsopt.measure.interleave import Call, interleave, pipeline_runner, ratio_spread
from gsopt.model import tensor_parallel
from gsopt.model.checkpoint import load_model
from gsopt.model.tokenizer import TOKENIZER_FILES, load_tokenizer, prompt_ids, synthetic_tokenizer
from gsopt.recipe.build import (
    CompiledStage,
    Recipe,
    apply,
    changes_model,
    load_draft_model,
    load_recipe,
    lossy_reasons,
)
from gsopt.runtime import DTYPES, resolve_device, resolve_dtype


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


def stage_rows(
    stages: Stages, eager: list[Call], optimised: list[Call], recipe_compiles: bool
) -> list[dict[str, Any]]:
    """Per stage: median ms (decode: per token), and for a stage the recipe changed, its
    speed-up with the spread of the per-round ratios. An unchanged stage has no speed-up:
    any difference there is noise."""
    rows = []
    for stage in STAGES if isinstance(stages, Stages) else CTC_STAGES:
        fn = getattr(stages, stage)
        compiled = getattr(fn, "step", fn)  # a captured step wraps a compiled one
        if stage == "decode":  # per token, per round: the median step of each call
            base = [statistics.median(c.stages.get("decode") or [0.0]) for c in eager[1:]]
            mine = [statistics.median(c.stages.get("decode") or [0.0]) for c in optimised[1:]]
        else:
            base = [c.stage_s(stage) for c in eager[1:]]
            mine = [c.stage_s(stage) for c in optimised[1:]]
        changed = stage in stages.changed
        spread = ratio_spread(base, mine) if changed and min(base) > 0 else None
        first = optimised[0].stage_s(stage)
        steady = statistics.median(c.stage_s(stage) for c in optimised[1:])
        compiles = isinstance(compiled, CompiledStage)
        rows.append(
            {
                "stage": stage,
                "backend": stages.labels.get(stage, "eager"),
                "changed": changed,
                "eager_ms": 1e3 * statistics.median(base),
                "recipe_ms": 1e3 * statistics.median(mine),
                "speedup": spread["median"] if spread else None,
                "speedup_p10": spread["p10"] if spread else None,
                "speedup_p90": spread["p90"] if spread else None,
                "within_noise": spread["within_noise"] if spread else None,
                # The first call's excess over a steady call, for stages that compile.
                "compile_s": max(0.0, first - steady) if compiles and recipe_compiles else 0.0,
                "graphs": getattr(compiled, "graphs", 0),
                "graph_breaks": getattr(compiled, "graph_breaks", 0),
                "recompiles": getattr(compiled, "recompiles", 0),
                "cudagraph_captures": getattr(fn, "captures", 0),
                "cudagraph_skips": getattr(compiled, "cudagraph_skips", 0),
            }
        )
    return rows


def end_to_end(stages: Stages, eager: list[Call], optimised: list[Call]) -> dict[str, Any]:
    """The whole call's speed-up with its spread, and how many of the milliseconds saved
    were saved in the stages the recipe changed."""
    base, mine = [c.total for c in eager[1:]], [c.total for c in optimised[1:]]
    spread = ratio_spread(base, mine)

    def saved_ms(selected) -> float:
        return 1e3 * sum(
            statistics.median(c.stage_s(s) for c in eager[1:])
            - statistics.median(c.stage_s(s) for c in optimised[1:])
            for s in selected
        )

    return {
        "eager_ms": 1e3 * statistics.median(base),
        "recipe_ms": 1e3 * statistics.median(mine),
        "speedup": spread["median"],
        "speedup_p10": spread["p10"],
        "speedup_p90": spread["p90"],
        "within_noise": spread["within_noise"],
        "saved_ms": 1e3 * (statistics.median(base) - statistics.median(mine)),
        "saved_in_changed_stages_ms": saved_ms(sorted(stages.changed)),
    }


def first_divergence(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int] | None:
    """(row, token index) of the first differing greedy token, or None."""
    diff = (a != b).nonzero()
    if len(diff) == 0:
        return None
    row, col = min(diff.tolist(), key=lambda rc: (rc[1], rc[0]))
    return row, col


def environment(device: torch.device) -> dict[str, str]:
    """What every recorded result names: device (with the CPU's vector ISA), versions,
    commit."""

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

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        isa = torch.backends.cpu.get_cpu_capability()
        name = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {isa})"
    return {
        "device": name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "ibm-fms": getattr(fms, "__version__", "unknown"),
        "commit": commit or "unknown",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def check_writable_folder(path: Path) -> None:
    """Refuse an output folder before the run, not after it."""
    if path.exists() and not path.is_dir():
        raise GsoptError(f"--out {path}: exists and is not a folder; name a folder")
    parent = next((p for p in [path, *path.parents] if p.exists()), Path("."))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise GsoptError(f"--out {path}: {parent} is not writable; choose another folder")


def write_atomic(path: Path, text: str) -> None:
    """Never leave a half-written file: write beside it, then rename. The file gets the
    permissions any new file gets (the umask), not mkstemp's private 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def to_json(data: Any) -> str:
    """Strict JSON: an undefined figure is null, never NaN."""
    return json.dumps(data, indent=2, allow_nan=False) + "\n"


def _speedup(row: dict[str, Any]) -> str:
    if row.get("changed") is False or row["speedup"] is None:
        return "-"
    text = f"{row['speedup']:.2f}x ({row['speedup_p10']:.2f}-{row['speedup_p90']:.2f})"
    return text + (" within noise" if row["within_noise"] else "")


def render_markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    table = tabulate(
        [
            [
                r["stage"],
                r["backend"],
                f"{r['eager_ms']:.2f}",
                f"{r['recipe_ms']:.2f}",
                _speedup(r),
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
            "speed-up (p10-p90)",
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
        f" {report['max_new_tokens']} new tokens, median of {report['repeats']} interleaved "
        "rounds after a warm-up round.",
        f"Device: {env['device']}; torch {env['torch']}, transformers {env['transformers']}, "
        f"ibm-fms {env['ibm-fms']}; commit {env['commit']}; {env['date']}.",
        "",
        table,
        "",
        (
            "decode: ms per token; other stages: ms per call."
            if any(r["stage"] == "decode" for r in report["stages"])
            else "ms per call. Granite Speech 5.0 (CTC) has no projector and no decoder: "
            "no prefill or decode stage to show."
        )
        + " Speed-ups are medians of the per-round ratios, with their 10th-90th "
        "percentiles; a stage the recipe leaves as the baseline runs it shows '-'.",
        "",
        f"End to end: eager {e2e['eager_ms']:.1f} ms, recipe {e2e['recipe_ms']:.1f} ms "
        f"({_speedup(e2e)}); {e2e['saved_ms']:.1f} ms saved, "
        f"{e2e['saved_in_changed_stages_ms']:.1f} ms of it in the stages the recipe changed.",
        f"Agreement: {report['agreement']}.",
    ]
    if report["lossy"]:
        lines.append(f"Lossy recipe: {'; '.join(report['lossy'])}.")
    if report["accuracy"]:
        acc = report["accuracy"]
        lines.append(
            f"Teacher-forced on eager's tokens ({acc['positions']} positions): next-token KL "
            f"median {acc['kl_median']:.2e}, max {acc['kl_max']:.2e}; logits' relative RMS "
            f"error median {acc['logits_rel_rms_median']:.2e}, max "
            f"{acc['logits_rel_rms_max']:.2e}. (Random weights give nearly flat "
            "distributions whose argmax flips easily: these figures, not token agreement, "
            "measure the change.)"
        )
    if report["speculation"]:
        spec = report["speculation"]
        lines.append(
            f"Speculation (all calls): {spec['drafted']} tokens drafted, {spec['accepted']} "
            f"accepted, {spec['forwards']} decoder forwards, "
            f"{spec['tokens_per_forward']:.2f} tokens per forward of a row."
        )
    if report["notes"]:
        lines += ["", "Fallbacks on this machine:", *[f"- {n}" for n in report["notes"]]]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    if args.repeats < 1:
        raise GsoptError(f"--repeats must be at least 1, got {args.repeats}")
    if args.max_new_tokens < 1:
        raise GsoptError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    out = Path(args.out)
    check_writable_folder(out)
    device = resolve_device(args.device)
    recipe: Recipe = load_recipe(args.recipe)
    model_name, default_dtype = default_model(device)
    source = args.model or model_name
    dtype_name = args.dtype or default_dtype
    resolve_dtype(dtype_name, device)
    files = [*args.files, *args.audio]
    waves = [load_audio(f) for f in files] if files else [sample_audio()]
    rank = tensor_parallel.start(args.tp)
    if args.tp > 1:  # every rank runs both pipelines on its shard; rank 0 reports
        if device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        model = tensor_parallel.load_tensor_parallel(
            source, device=device, dtype=DTYPES[dtype_name], lora="live"
        )
    else:
        model = load_model(source, device=device, dtype=DTYPES[dtype_name], lora="live")
    ctc = not hasattr(model, "decoder")  # Granite Speech 5.0: no prompt, no decoder
    template = None if ctc else prompt_template(model.config, source)

    # A recipe that transforms the model (dtype, merged LoRA, kernels) gets its own copy, so
    # both run interleaved on the same weights; one that only wraps stages shares the model.
    recipe_model = copy.deepcopy(model) if changes_model(model, recipe) else model
    draft = None
    if args.draft_model is not None:
        draft = load_draft_model(
            args.draft_model,
            model.config,
            device=device,
            dtype=DTYPES[dtype_name],
            target_source=source,
        )
    stages = apply(recipe_model, recipe, draft)
    recipe_pipeline = (CTCPipeline if ctc else Pipeline)(recipe_model, stages)
    baseline = CTCPipeline(model) if ctc else Pipeline(model, Stages.eager(model, "dynamic"))
    runners = {
        "eager": pipeline_runner(baseline, waves, template, args.max_new_tokens),
        "recipe": pipeline_runner(recipe_pipeline, waves, template, args.max_new_tokens),
    }
    compiles = any(isinstance(getattr(stages, s), CompiledStage) for s in stages.labels)
    if compiles:
        print(
            f"gsopt apply: compiling {recipe.name}'s stages on the first call (on a CPU this "
            "can take a minute)",
            file=sys.stderr,
        )
    calls = interleave(runners, args.repeats + 1)
    eager, optimised = calls["eager"], calls["recipe"]
    divergence = first_divergence(eager[-1].tokens, optimised[-1].tokens)
    lossy = lossy_reasons(recipe, DTYPES[dtype_name], device.type)
    agreement_rate = float((eager[-1].tokens == optimised[-1].tokens).float().mean())
    if divergence is None:
        agreement = "greedy tokens identical to eager"
    else:
        agreement = (
            f"{100 * agreement_rate:.1f}% of tokens agree; first divergence at row "
            f"{divergence[0]}, token {divergence[1]}"
        )
    accuracy = None
    if recipe_model is not model and lossy and not ctc:  # how far did the model move?
        accuracy = teacher_forced(model, recipe_model, waves, template, eager[-1].tokens)
    report = {
        "recipe": recipe.to_dict(),
        "model": str(source),
        "dtype": recipe.dtype or dtype_name,
        "audio_seconds": sum(len(w) for w in waves) / 16000,
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "environment": environment(device),
        "stages": stage_rows(stages, eager, optimised, compiles),
        "end_to_end": end_to_end(stages, eager, optimised),
        "agreement": agreement,
        "tokens_identical": divergence is None,
        "token_agreement": agreement_rate,
        "first_divergence": list(divergence) if divergence is not None else None,
        "lossy": lossy,
        "accuracy": accuracy,
        "speculation": recipe_pipeline.speculation_stats.to_json()
        if getattr(stages, "speculation", None) is not None
        else None,
        "notes": stages.notes,
    }
    report["tensor_parallel"] = args.tp
    markdown = render_markdown(report)
    if rank == 0:
        write_atomic(out / "report.json", to_json(report))
        write_atomic(out / "report.md", markdown)
        print(markdown, end="")
        print(f"wrote {out / 'report.json'} and {out / 'report.md'}")
    if divergence is not None and not lossy:
        raise GsoptError(
            f"recipe {recipe.name} is lossless but changed the greedy tokens ({agreement})"
        )
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "apply",
        help="apply a recipe; check and time it against eager",
        description="Run the eager baseline (FMS's stock decoder) and a recipe on the same "
        "audio, interleaved; check the greedy tokens agree (a lossy recipe reports how far "
        "they moved instead) and print each stage's speed-up; write report.json and report.md.",
    )
    parser.add_argument(
        "files", nargs="*", metavar="FILE", help="audio files (none: the bundled sample)"
    )
    parser.add_argument("--recipe", required=True, help="a built-in recipe name or a .toml path")
    parser.add_argument(
        "--model",
        metavar="DIR|VARIANT",
        help="checkpoint folder or variant (default: 3.3-8b bf16 on CUDA, cpu-small fp32 on CPU)",
    )
    parser.add_argument(
        "--audio", nargs="*", default=[], metavar="FILE", help="audio files (alias of FILE)"
    )
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--dtype", help="float32, bfloat16 or float16 (default: fits the device)")
    parser.add_argument(
        "--max-new-tokens", type=int, default=32, metavar="N", help="tokens decoded per call"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after the first")
    parser.add_argument("--out", default="gsopt-report", help="folder for report.json/.md")
    parser.add_argument(
        "--draft-model", metavar="DIR|VARIANT", help="the draft model of speculative-draft"
    )
    tensor_parallel.add_argument(parser)
    parser.set_defaults(run=run)
    return parser
