"""`gsopt apply`: run the eager baseline and a recipe on the same inputs, check that they
agree, and report each stage's speed-up (table on stdout, report.json + report.md on disk)."""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Any

import torch
from tabulate import tabulate

from gsopt.audio.files import load_audio, sample_audio
from gsopt.audio.frontend import SAMPLE_RATE
from gsopt.commands import options
from gsopt.commands.options import at_least, recipe_files, recipe_list
from gsopt.errors import GsoptError
from gsopt.measure.accuracy import stage_errors, teacher_forced
from gsopt.measure.interleave import Call, interleave, pipeline_runner, ratio_spread
from gsopt.model import parallel
from gsopt.model.family import family_of
from gsopt.model.loader import load_models
from gsopt.model.parallel import join
from gsopt.model.tokenizer import prompt_template
from gsopt.recipe import build_pipeline, load_recipe
from gsopt.recipe.compile import compiles
from gsopt.recipe.settings import Recipe, lossy_reasons
from gsopt.results import check_output, environment, to_json, write_atomic
from gsopt.runtime import default_model, dtype_name, resolve_dtype

# The recipe every other is checked and timed against: FMS as shipped, every stage eager.
BASELINE = "eager"


def stage_rows(
    stages, eager: list[Call], optimised: list[Call], recipe_compiles: bool
) -> list[dict[str, Any]]:
    """Per stage: median ms (decode: per token), and for a stage the recipe changed, its
    speed-up with the spread of the per-round ratios. An unchanged stage has no speed-up:
    any difference there is noise."""
    rows = []
    for stage in stages.report.labels:
        fn = getattr(stages, stage)
        compiled = getattr(fn, "step", fn)  # a captured step wraps a compiled one
        if stage == "decode":  # per token, per round: the median step of each call
            base = [statistics.median(c.stages.get("decode") or [0.0]) for c in eager[1:]]
            mine = [statistics.median(c.stages.get("decode") or [0.0]) for c in optimised[1:]]
        else:
            base = [c.stage_s(stage) for c in eager[1:]]
            mine = [c.stage_s(stage) for c in optimised[1:]]
        changed = stage in stages.report.changed
        # A stage the recipe skipped (no decoder work for confident rows) has no ratio.
        spread = ratio_spread(base, mine) if changed and min(base) > 0 and min(mine) > 0 else None
        first = optimised[0].stage_s(stage)
        steady = statistics.median(c.stage_s(stage) for c in optimised[1:])
        rows.append(
            {
                "stage": stage,
                "backend": stages.report.labels[stage],
                "changed": changed,
                "eager_ms": 1e3 * statistics.median(base),
                "recipe_ms": 1e3 * statistics.median(mine),
                "speedup": spread["median"] if spread else None,
                "speedup_p10": spread["p10"] if spread else None,
                "speedup_p90": spread["p90"] if spread else None,
                "within_noise": spread["within_noise"] if spread else None,
                # The first call's excess over a steady call, for stages that compile.
                "compile_s": max(0.0, first - steady) if compiles(fn) and recipe_compiles else 0.0,
                "graphs": getattr(compiled, "graphs", 0),
                "graph_breaks": getattr(compiled, "graph_breaks", 0),
                "recompiles": getattr(compiled, "recompiles", 0),
                "cudagraph_captures": getattr(fn, "captures", 0),
                "cudagraph_skips": getattr(compiled, "cudagraph_skips", 0),
            }
        )
    return rows


def end_to_end(stages, eager: list[Call], optimised: list[Call]) -> dict[str, Any]:
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
        "saved_in_changed_stages_ms": saved_ms(sorted(stages.report.changed)),
    }


def first_divergence(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int] | None:
    """(row, token index) of the first differing greedy token, or None."""
    diff = (a != b).nonzero()
    if len(diff) == 0:
        return None
    row, col = min(diff.tolist(), key=lambda rc: (rc[1], rc[0]))
    return row, col


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
            f"{acc['logits_rel_rms_max']:.2e}; audio stages' relative RMS error: "
            + ", ".join(f"{k} {v:.2e}" for k, v in acc["stage_rel_rms"].items())
            + ". (Random weights give nearly flat "
            "distributions whose argmax flips easily: these figures, not token agreement, "
            "measure the change.)"
        )
    if report["speculation"]:
        spec = report["speculation"]
        per_forward = spec["tokens_per_forward"]
        lines.append(
            f"Speculation (all calls): {spec['drafted']} tokens drafted, {spec['accepted']} "
            f"accepted, {spec['forwards']} decoder forwards"
            + (f", {per_forward:.2f} tokens per forward of a row." if per_forward else ".")
        )
        rows = [
            f"row {i} {r['decision']} ({r['accepted']} of {r['drafted']} draft tokens kept, "
            f"{r['forwards']} forwards)"
            for i, r in enumerate(spec["rows"])
        ]
        lines.append(f"Each row, last call: {'; '.join(rows)}.")
    if report["notes"]:
        lines += ["", "Fallbacks on this machine:", *[f"- {n}" for n in report["notes"]]]
    return "\n".join(lines) + "\n"


def apply_one(
    recipe: Recipe,
    model,
    draft,
    baseline,
    waves: list[torch.Tensor],
    template: list[int] | None,
    args: argparse.Namespace,
    device: torch.device,
) -> dict[str, Any]:
    """One recipe against the baseline, interleaved on the same inputs: its report."""
    pipeline = build_pipeline(model, recipe, draft_model=draft)
    stages = pipeline.stages
    runners = {
        "eager": pipeline_runner(baseline, waves, template, args.max_new_tokens),
        "recipe": pipeline_runner(pipeline, waves, template, args.max_new_tokens),
    }
    compiled = any(compiles(getattr(stages, s)) for s in stages.report.labels)
    if compiled:
        print(
            f"gsopt apply: compiling {recipe.name}'s stages on the first call (on a CPU this "
            "can take a minute)",
            file=sys.stderr,
        )
    calls = interleave(runners, args.repeats + 1)
    eager, optimised = calls["eager"], calls["recipe"]
    divergence = first_divergence(eager[-1].tokens, optimised[-1].tokens)
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    lossy = lossy_reasons(recipe, dtype, device.type)
    agreement_rate = float((eager[-1].tokens == optimised[-1].tokens).float().mean())
    if divergence is None:
        agreement = "greedy tokens identical to eager"
    else:
        agreement = (
            f"{100 * agreement_rate:.1f}% of tokens agree; first divergence at row "
            f"{divergence[0]}, token {divergence[1]}"
        )
    accuracy = None
    if pipeline.model is not model and lossy and template is not None:  # how far it moved
        accuracy = teacher_forced(model, pipeline.model, waves, template, eager[-1].tokens)
        accuracy["stage_rel_rms"] = stage_errors(model, pipeline.model, waves)
    speculation = getattr(stages.plan, "speculation", None)
    return {
        "recipe": recipe.to_dict(),
        "model": str(args.model),
        "dtype": recipe.dtype or dtype_name(dtype),
        "audio_seconds": sum(len(w) for w in waves) / SAMPLE_RATE,
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "environment": environment(device),
        "stages": stage_rows(stages, eager, optimised, compiled),
        "end_to_end": end_to_end(stages, eager, optimised),
        "agreement": agreement,
        "tokens_identical": divergence is None,
        "token_agreement": agreement_rate,
        "first_divergence": list(divergence) if divergence is not None else None,
        "lossy": lossy,
        "accuracy": accuracy,
        "speculation": pipeline.speculation_stats.to_json() if speculation else None,
        "notes": list(stages.report.notes),
        "tensor_parallel": args.tp,
    }


def run(args: argparse.Namespace) -> int:
    at_least("--repeats", args.repeats, 1)
    at_least("--max-new-tokens", args.max_new_tokens, 1)
    names = recipe_list(args.recipe)
    recipes = [load_recipe(name) for name in names]
    options.warn_unused_draft(args, recipes, "apply")
    files = [*args.files, *args.audio]
    out = check_output(args.out, folder=True, inputs=[*files, *recipe_files(names)])
    layout = join(args.tp, args.device)
    if layout.replicas > 1:
        raise GsoptError(
            f"apply runs one model: start {args.tp} torchrun process(es) for --tp {args.tp}, "
            f"not {layout.world}"
        )
    device = layout.device(args.device)
    args.model = args.model or default_model(device.type)
    dtype = resolve_dtype(args.dtype, device)
    waves = [load_audio(f) for f in files] if files else [sample_audio()]
    model, draft = load_models(
        args.model,
        device=device,
        dtype=dtype,
        draft=args.draft_model,
        layout=layout,
        memory_check=args.memory_check,
    )
    template = prompt_template(model.config, args.model) if family_of(model).decoder else None
    baseline = build_pipeline(model, BASELINE)  # every rank runs both; rank 0 reports
    failed = []
    for recipe in recipes:
        report = apply_one(recipe, model, draft, baseline, waves, template, args, device)
        folder = out if len(recipes) == 1 else out / recipe.name
        if layout.rank == 0:
            write_atomic(folder / "report.json", to_json(report))
            markdown = render_markdown(report)
            write_atomic(folder / "report.md", markdown)
            print(to_json(report) if args.json else markdown, end="")
            print(f"wrote {folder / 'report.json'} and {folder / 'report.md'}", file=sys.stderr)
        if not report["tokens_identical"] and not report["lossy"]:
            failed.append(
                f"recipe {recipe.name} is lossless but changed the greedy tokens "
                f"({report['agreement']})"
            )
    if failed:
        raise GsoptError("; ".join(failed))
    return 0


def add_parser(subparsers, name: str, help: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name,
        help=help,
        description="Run the eager baseline (FMS's stock decoder) and each recipe on the same "
        "audio, interleaved; check the greedy tokens agree (a lossy recipe reports how far "
        "they moved instead) and print each stage's speed-up; write report.json and report.md.",
    )
    parser.add_argument(
        "files", nargs="*", metavar="FILE", help="audio files (none: the bundled sample)"
    )
    options.add_recipe(parser, required=True)
    options.add_model(parser)
    parser.add_argument(
        "--audio", nargs="*", default=[], metavar="FILE", help="audio files (alias of FILE)"
    )
    options.add_device(parser)
    parser.add_argument(
        "--max-new-tokens", type=int, default=32, metavar="N", help="tokens decoded per call"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after the first")
    parser.add_argument(
        "--out",
        default="gsopt-report",
        metavar="DIR",
        help="folder for report.json and report.md (with several recipes, one subfolder each)",
    )
    options.add_json(parser)
    options.add_draft_model(parser)
    parallel.add_argument(parser)
    options.add_memory_check(parser)
    parser.set_defaults(run=run)
    return parser
