"""IBM's relaxed speculation with a controlled share of CTC-confident rows, and beam search.

1. `speculation`: a batch of clips with oracle drafts (the clips' own greedy output, a fraction
   of it kept, the rest random over the whole vocabulary) whose CTC confidences put a known
   share of rows at or under `ctc_threshold`: `speculative-ctc-relaxed` at each share against
   `speculative-ctc` (exact) and plain `compile-decoder`, calls interleaved. The audio floor
   is the frontend + encoder + projector + CTC stages of the same calls: what a call costs
   when no row needs the decoder.
2. `beams`: gsopt's beam search (`compile-decoder` with `num_beams`) at 2 and 4 beams against
   its greedy decoding and against transformers' `generate(num_beams=...)` on the same
   weights, fixed length (end-of-text suppressed on both sides, as min_new_tokens does).
   transformers 5.x forgets Granite's logits_scaling, so its beams may pick other tokens:
   the cost is compared here, the tokens in tests/test_beam.py.

    python bench/bench_speculation.py speculation --out bench/results/speculation-cpu-real-width
    python bench/bench_speculation.py beams --model tiny --out bench/results/beams-cpu-tiny

Each writes OUT.json, OUT.md and OUT.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import torch

from gsopt.audio.frontend import LogMelFrontend, num_audio_tokens
from gsopt.commands.bench import clip, reference_pair
from gsopt.engine.drafts import oracle
from gsopt.engine.pipeline import prompt_for
from gsopt.engine.speculate import SpeculationStats
from gsopt.measure.interleave import Call, interleave, pipeline_runner, ratio_spread
from gsopt.model.tokenizer import prompt_template
from gsopt.recipe import build_pipeline, load_recipe
from gsopt.results import environment, to_json, write_atomic
from gsopt.runtime import DEFAULT_RECIPE

AUDIO_STAGES = ("frontend", "encoder", "projector", "ctc")
CONFIDENT, UNSURE = 0.0, 9.0  # CTC confidences under and over any shipped ctc_threshold


def median_ms(values: list[float]) -> float:
    return 1e3 * statistics.median(values)


def summary(calls: list[Call]) -> dict:
    """Median ms of each stage and of the whole call over the timed calls (the first is the
    warm-up)."""
    steady = calls[1:]
    stages = sorted({s for c in steady for s in c.stages})
    return {
        "end_to_end_ms": median_ms([c.total for c in steady]),
        "first_call_ms": 1e3 * calls[0].total,
        "stages_ms": {s: median_ms([c.stage_s(s) for c in steady]) for s in stages},
    }


def speculation(args) -> dict:
    device = torch.device("cpu")
    model, _ = reference_pair(args.model, device, torch.float32, with_peer=False)
    waves = [clip(args.seconds)] * args.batch
    template = prompt_template(model.config)
    n = args.max_new_tokens
    greedy = build_pipeline(model, DEFAULT_RECIPE)(waves, template, n).tolist()
    vocab = model.config.decoder.src_vocab_size
    drafts = oracle(greedy, args.accuracy, vocab, seed=1)
    relaxed = build_pipeline(model, "speculative-ctc-relaxed")
    exact = build_pipeline(model, "speculative-ctc")
    plain = build_pipeline(model, "compile-decoder")
    stats: dict[str, dict] = {}

    def speculating(name, pipeline, **kwargs):
        run = pipeline_runner(pipeline, waves, template, n, drafts=drafts, **kwargs)

        def call(annotate: bool = False) -> Call:
            pipeline.speculation_stats = SpeculationStats()
            out = run(annotate)
            stats[name] = pipeline.speculation_stats.to_json()
            return out

        return call

    runners = {"compile-decoder": pipeline_runner(plain, waves, template, n)}
    runners["speculative-ctc (exact)"] = speculating("speculative-ctc (exact)", exact)
    for share in args.shares:
        confident = round(share * args.batch)
        confidences = [CONFIDENT] * confident + [UNSURE] * (args.batch - confident)
        name = f"speculative-ctc-relaxed, {share:.0%} confident"
        runners[name] = speculating(name, relaxed, confidences=confidences)
    calls = interleave(runners, args.repeats + 1)
    base = [c.total for c in calls["compile-decoder"][1:]]
    rows = []
    for name, row_calls in calls.items():
        row = {"name": name, **summary(row_calls)}
        audio = sum(row["stages_ms"].get(s, 0.0) for s in AUDIO_STAGES)
        row["audio_floor_ms"] = audio
        row["over_audio_floor"] = row["end_to_end_ms"] / audio - 1
        row["speedup_vs_compile_decoder"] = ratio_spread(base, [c.total for c in row_calls[1:]])
        if name in stats:
            row["speculation"] = stats[name]
        rows.append(row)
    return {
        "benchmark": "speculation",
        "environment": environment(device),
        "settings": {
            "model": args.model,
            "batch": args.batch,
            "audio_seconds": args.seconds,
            "max_new_tokens": n,
            "draft_accuracy": args.accuracy,
            "confident_shares": args.shares,
            "repeats": args.repeats,
            "relaxed": dataclasses.asdict(load_recipe("speculative-ctc-relaxed").speculate),
            "drafts": "oracle: the clips' greedy output (static-kv), each token kept with "
            "probability draft_accuracy, else random over the whole vocabulary; CTC "
            f"confidence {CONFIDENT} for the confident rows (the first of the batch), "
            f"{UNSURE} for the others",
            "decoding": "fixed length (end-of-text ignored); calls interleaved, one warm-up",
        },
        "rows": rows,
    }


def transformers_runner(hf, waves, template, n: int, beams: int):
    """transformers' generate (eager) with gsopt's log-mel frontend, timed whole."""
    frontend = LogMelFrontend()
    ids = torch.stack(
        [prompt_for(num_audio_tokens(len(w)), template, hf.config.audio_token_index) for w in waves]
    )
    waves_t = torch.stack(waves)
    lengths = torch.full((len(waves),), waves_t.shape[1])

    def call(annotate: bool = False) -> Call:
        start = time.perf_counter()
        with torch.no_grad():
            features, _ = frontend(waves_t, lengths)
            hf.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                input_features=features,
                max_new_tokens=n,
                min_new_tokens=n,
                num_beams=beams,
                do_sample=False,
            )
        return Call({}, time.perf_counter() - start)

    return call


def beams(args) -> dict:
    # Each beam count keeps its own static graph, as in a server that runs one: otherwise the
    # interleaved counts would turn the batch axis dynamic (a recompile inside the timing).
    torch._dynamo.config.automatic_dynamic_shapes = False
    device = torch.device("cpu")
    model, hf = reference_pair(args.model, device, torch.float32)
    waves = [clip(args.seconds)] * args.batch
    template = prompt_template(model.config)
    n = args.max_new_tokens
    runners = {}
    for count in (1, *args.beams):
        recipe = dataclasses.replace(load_recipe("compile-decoder"), num_beams=count)
        pipeline = build_pipeline(model, recipe)
        runners[f"gsopt compile-decoder, {count} beam(s)"] = pipeline_runner(
            pipeline, waves, template, n
        )
        runners[f"transformers eager, {count} beam(s)"] = transformers_runner(
            hf, waves, template, n, count
        )
    calls = interleave(runners, args.repeats + 1)
    rows = []
    for name, row_calls in calls.items():
        row = {"name": name, **summary(row_calls)}
        count = name.split(", ")[1]
        gsopt_calls = calls[f"gsopt compile-decoder, {count}"][1:]
        row["gsopt_speedup_vs_this"] = ratio_spread(
            [c.total for c in row_calls[1:]], [c.total for c in gsopt_calls]
        )
        engine = name.split(", ")[0]
        greedy = calls[f"{engine}, 1 beam(s)"][1:]
        row["cost_vs_own_greedy"] = row["end_to_end_ms"] / median_ms([c.total for c in greedy])
        rows.append(row)
    return {
        "benchmark": "beams",
        "environment": environment(device),
        "settings": {
            "model": args.model,
            "batch": args.batch,
            "audio_seconds": args.seconds,
            "max_new_tokens": n,
            "beams": args.beams,
            "repeats": args.repeats,
            "decoding": "fixed length: end-of-text suppressed (gsopt stop_at_eos=False, "
            "transformers min_new_tokens = max_new_tokens); same random weights; gsopt's "
            "frontend feeds both; calls interleaved, one warm-up; automatic dynamic shapes "
            "off (one static graph per beam count)",
        },
        "rows": rows,
    }


def markdown(result: dict) -> str:
    env, settings = result["environment"], result["settings"]
    lines = [
        f"# {result['benchmark']}: {settings['model']}, batch {settings['batch']}, "
        f"{settings['audio_seconds']:g} s clips, {settings['max_new_tokens']} new tokens",
        "",
        f"{env['device']}; torch {env['torch']}, transformers {env['transformers']}, "
        f"ibm-fms {env['ibm-fms']}; commit {env['commit']}; {env['date']}.",
        "",
    ]
    if result["benchmark"] == "speculation":
        lines += [
            "| row | end to end ms | audio floor ms | over the floor | vs compile-decoder "
            "(p10-p90) | decoder forwards | rows on the decoder |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in result["rows"]:
            spec, speed = row.get("speculation"), row["speedup_vs_compile_decoder"]
            on_decoder = sum(r["decision"] != "accepted" for r in spec["rows"]) if spec else "all"
            lines.append(
                f"| {row['name']} | {row['end_to_end_ms']:.0f} | {row['audio_floor_ms']:.0f} | "
                f"{100 * row['over_audio_floor']:+.1f}% | {speed['median']:.2f}x "
                f"({speed['p10']:.2f}-{speed['p90']:.2f}) | "
                f"{spec['forwards'] if spec else '-'} | {on_decoder} |"
            )
    else:
        lines += [
            "| row | end to end ms | cost vs its own greedy | gsopt's speed-up over this row "
            "(p10-p90) |",
            "|---|---|---|---|",
        ]
        for row in result["rows"]:
            speed = row["gsopt_speedup_vs_this"]
            lines.append(
                f"| {row['name']} | {row['end_to_end_ms']:.0f} | "
                f"{row['cost_vs_own_greedy']:.2f}x | {speed['median']:.2f}x "
                f"({speed['p10']:.2f}-{speed['p90']:.2f}) |"
            )
    return "\n".join(lines) + "\n"


def chart(result: dict, path: Path) -> None:
    """Median end to end ms per row, split into the audio stages, the decoder and the rest."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    names = [r["name"] for r in rows]
    fig, ax = plt.subplots(figsize=(9, 0.6 * len(rows) + 1.5))
    if result["benchmark"] == "speculation":
        audio = [r["audio_floor_ms"] for r in rows]
        decoder = [r["stages_ms"].get("prefill", 0) + r["stages_ms"].get("decode", 0) for r in rows]
        rest = [r["end_to_end_ms"] - a - d for r, a, d in zip(rows, audio, decoder, strict=True)]
        ax.barh(names, audio, label="frontend + encoder + projector + CTC")
        ax.barh(names, decoder, left=audio, label="decoder (prefill + decode)")
        left = [a + d for a, d in zip(audio, decoder, strict=True)]
        ax.barh(names, rest, left=left, label="the rest (host work)")
        ax.legend(fontsize=7, loc="lower right")
    else:
        ax.barh(names, [r["end_to_end_ms"] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("median end to end ms per call")
    settings = result["settings"]
    ax.set_title(
        f"{result['benchmark']}: {settings['model']}, batch {settings['batch']}, "
        f"{settings['audio_seconds']:g} s, {result['environment']['device']}",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("benchmark", choices=("speculation", "beams"))
    parser.add_argument("--model", default="cpu-real-width")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--accuracy", type=float, default=0.9, help="oracle draft accuracy")
    parser.add_argument(
        "--shares", type=lambda t: [float(x) for x in t.split(",")], default=[0, 0.5, 0.9, 1.0]
    )
    parser.add_argument("--beams", type=lambda t: [int(x) for x in t.split(",")], default=[2, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True, help="OUT: writes OUT.json/.md/.png")
    args = parser.parse_args()
    result = speculation(args) if args.benchmark == "speculation" else beams(args)
    write_atomic(args.out.with_suffix(".json"), to_json(result))
    write_atomic(args.out.with_suffix(".md"), markdown(result))
    chart(result, args.out.with_suffix(".png"))
    print(markdown(result))


if __name__ == "__main__":
    main()
