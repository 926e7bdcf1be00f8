"""`gsopt explain`: where torch.compile breaks graphs and recompiles, per stage, for gsopt and
for transformers' reference model side by side.

For each stage: `torch._dynamo.explain` at the first sweep point (graphs, breaks, each break's
reason and source line), then a sweep over audio lengths x batch sizes through one compiled
function, counting graphs, recompiles with every failed guard (captured from dynamo's
`recompiles_verbose` logger, which lists all failures rather than the first), compile time,
inductor kernels and steady time. gsopt's stages run under three strategies:
- `exact`: static shapes, no padding (one graph per distinct shape: the unbounded baseline);
- `dynamic`: `dynamic=True`, no padding;
- `buckets`: static shapes, audio padded up to whole conformer attention blocks and the prompt
  to a multiple of 64 tokens, as a bucketing recipe pads them.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tabulate import tabulate
from tqdm import tqdm

from gsopt.audio.frontend import SAMPLE_RATE
from gsopt.commands import options
from gsopt.commands.options import one_recipe, recipe_files
from gsopt.engine.pipeline import prompt_for
from gsopt.errors import GsoptError
from gsopt.model.config import hf_model_class, to_hf_config
from gsopt.model.family import family_of
from gsopt.model.loader import load_target
from gsopt.model.tokenizer import prompt_template
from gsopt.recipe.build import PIPELINES, apply
from gsopt.recipe.settings import load_recipe
from gsopt.results import check_output, environment, to_json, write_atomic
from gsopt.runtime import DEFAULT_RECIPE, default_model, resolve_device

STRATEGIES = ("exact", "dynamic", "buckets")
BACKENDS = ("inductor", "aot_eager", "eager")
MAX_NEW_TOKENS = 16
# Room for every graph of the longest sweep: past dynamo's default limit (8) it falls back to
# eager silently and the counts would stop growing.
RECOMPILE_LIMIT = 64


@dataclass
class StageReport:
    side: str
    stage: str
    strategy: str
    graphs: int = 0
    graph_breaks: int = 0
    break_reasons: list[dict[str, str]] = field(default_factory=list)
    sweep_graphs: int = 0
    recompiles: int = 0
    recompile_reasons: list[str] = field(default_factory=list)
    compile_s: float = 0.0
    steady_ms: float = 0.0
    kernels: int | str = "n/a"


class RecompileLog(logging.Handler):
    """Collects dynamo's recompile messages (every failed guard of every cache entry)."""

    NAMES = ("torch._dynamo.guards.__recompiles_verbose", "torch._dynamo.guards.__recompiles")

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> RecompileLog:
        torch._logging.set_logs(recompiles_verbose=True)
        for name in self.NAMES:
            logger = logging.getLogger(name)
            logger.addHandler(self)
            logger.propagate = False  # keep them off stderr
        return self

    def __exit__(self, *exc: Any) -> None:
        for name in self.NAMES:
            logger = logging.getLogger(name)
            logger.removeHandler(self)
            logger.propagate = True
        torch._logging.set_logs()


def _explain(fn: Callable, args: tuple) -> tuple[int, int, list[dict[str, str]]]:
    """Graphs, breaks and the distinct (reason, source line) of each break. Under no_grad, as
    the pipeline runs: with grad on, in-place cache writes would make the cache require grad."""
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch._dynamo.explain(fn)(*args)
    reasons: list[dict[str, str]] = []
    for br in out.break_reasons:
        frame = br.user_stack[-1] if br.user_stack else None
        entry = {
            "reason": br.reason.splitlines()[0],
            "where": f"{frame.filename}:{frame.lineno}" if frame else "?",
        }
        if entry not in reasons:
            reasons.append(entry)
    return out.graph_count, out.graph_break_count, reasons


def _timed(fn: Callable, args: tuple) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def sweep(
    fn: Callable,
    points: list[tuple],
    *,
    backend: str,
    dynamic: bool | None,
    fullgraph: bool,
    report: StageReport,
) -> None:
    """Run `fn` compiled over every point twice; the first call of a point that compiles is
    compile time, the second is steady time."""
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
    compiled = torch.compile(fn, backend=counter, dynamic=dynamic, fullgraph=fullgraph)
    kernels_before = _kernel_count()
    steady = []
    with (
        torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT),
        RecompileLog() as log,
        torch.no_grad(),
    ):
        for args in points:
            frames = counter.frame_count
            elapsed = _timed(compiled, args)
            if counter.frame_count > frames:
                report.compile_s += elapsed
            steady.append(1e3 * _timed(compiled, args))
    report.sweep_graphs = counter.frame_count
    report.recompiles = len(log.messages)
    report.recompile_reasons = log.messages
    report.steady_ms = statistics.median(steady)
    if backend == "inductor":
        report.kernels = _kernel_count() - kernels_before


def _kernel_count() -> int:
    import torch._inductor.metrics as metrics

    return metrics.generated_kernel_count


# --- gsopt's stages ------------------------------------------------------------------------


def gsopt_points(model, stages, seconds: list[float], batches: list[int], strategy: str):
    """Each stage's arguments at every sweep point, as the pipeline passes them (recorded
    from an eager run of it). `buckets` pads audio and prompts as a bucketing recipe does."""
    names = family_of(model).stages
    points: dict[str, list[tuple]] = {s: [] for s in names}
    generator = torch.Generator().manual_seed(0)
    buckets = strategy == "buckets"
    plan = dataclasses.replace(
        stages.plan, audio_buckets=buckets, prefill_bucket=64 if buckets else 1
    )
    pipeline = PIPELINES[family_of(model).name].pipeline(
        model, dataclasses.replace(stages, plan=plan)
    )
    template = prompt_template(model.config) if family_of(model).decoder else None
    for sec in seconds:
        for batch in batches:
            waves = [torch.randn(int(sec * SAMPLE_RATE), generator=generator) * 0.1] * batch
            record: dict[str, tuple] = {}
            pipeline(waves, template, MAX_NEW_TOKENS, record=record)
            for stage in names:
                points[stage].append(record[stage])
    return points


def explain_gsopt(
    model,
    seconds: list[float],
    batches: list[int],
    strategies: list[str],
    backend: str,
    done: Callable[[StageReport], None] = lambda report: None,
) -> list[StageReport]:
    """Explain each stage once (the code is the same under every strategy), then sweep it
    under each strategy; `done` is told of each report as it is finished."""
    stages = apply(model, load_recipe(DEFAULT_RECIPE))
    reports = []
    explained: dict[str, tuple] = {}
    for strategy in strategies:
        points = gsopt_points(model, stages, seconds, batches, strategy)
        for stage in family_of(model).stages:
            fn = getattr(stages, stage)
            if stage not in explained:
                explained[stage] = _explain(fn, points[stage][0])
            report = StageReport("gsopt", stage, strategy)
            report.graphs, report.graph_breaks, report.break_reasons = explained[stage]
            sweep(
                fn,
                points[stage],
                backend=backend,
                dynamic=True if strategy == "dynamic" else False,
                fullgraph=True,
                report=report,
            )
            reports.append(report)
            done(report)
    return reports


# --- transformers' reference ----------------------------------------------------------------


def reference_model(model):
    """transformers' model with the same shapes as the gsopt model (random weights: compile
    analysis needs shapes and code paths, not trained numbers)."""
    torch.manual_seed(0)
    device = next(model.parameters()).device
    return hf_model_class(model.config)(to_hf_config(model.config)).eval().to(device)


def reference_points(model, ref, seconds: list[float], batches: list[int]) -> list[tuple]:
    device = next(model.parameters()).device
    ctc = not family_of(model).decoder
    template = None if ctc else prompt_template(model.config)
    width = 4 * model.config.num_mel_bins if ctc else model.config.encoder.input_dim
    points = []
    for sec in seconds:
        for batch in batches:
            samples = int(sec * SAMPLE_RATE)
            frames = (samples // 160 + 1) // 2
            features = torch.randn(batch, frames, width, device=device)
            if ctc:
                points.append((features,))
                continue
            ids = prompt_for(
                model.config.audio_tokens(samples), template, ref.config.audio_token_index
            )
            points.append((ids.expand(batch, -1).to(device), features))
    return points


def explain_reference(
    model, seconds: list[float], batches: list[int], backend: str
) -> list[StageReport]:
    """transformers' full forward (input_ids + input_features -> logits; for 5.0 features
    -> CTC logits)."""
    ref = reference_model(model)

    def forward(*inputs: torch.Tensor) -> torch.Tensor:
        if len(inputs) == 1:
            return ref(input_features=inputs[0]).logits
        return ref(input_ids=inputs[0], input_features=inputs[1]).logits

    points = reference_points(model, ref, seconds, batches)
    report = StageReport("transformers", "forward", "default")
    report.graphs, report.graph_breaks, report.break_reasons = _explain(forward, points[0])
    sweep(forward, points, backend=backend, dynamic=None, fullgraph=False, report=report)
    return [report]


# --- the command -----------------------------------------------------------------------------


def render(reports: list[StageReport]) -> str:
    rows = [
        [
            r.side,
            r.stage,
            r.strategy,
            r.graphs,
            r.graph_breaks,
            r.sweep_graphs,
            r.recompiles,
            f"{r.compile_s:.1f}",
            f"{r.steady_ms:.2f}",
            r.kernels,
        ]
        for r in reports
    ]
    table = tabulate(
        rows,
        headers=[
            "side",
            "stage",
            "strategy",
            "graphs",
            "breaks",
            "sweep graphs",
            "recompiles",
            "compile s",
            "steady ms",
            "kernels",
        ],
        tablefmt="github",
    )
    lines = [table]
    for r in reports:
        for br in r.break_reasons:
            lines.append(f"break  {r.side}/{r.stage}: {br['reason']} ({br['where']})")
        if r.recompile_reasons and r.strategy != "exact":
            lines.append(f"recompile reasons {r.side}/{r.stage}/{r.strategy}:")
            lines += ["    " + m.replace("\n", "\n    ") for m in r.recompile_reasons]
    return "\n".join(lines) + "\n"


# The default sweep takes about a minute on `tiny` on 2 CPU cores (1m13s measured; with batch
# sizes 1,2 it took 3m25s, transformers' side recompiling 39 times); --full is the long one.
QUICK = {"audio_seconds": "1,10", "batch_size": "1"}
FULL = {"audio_seconds": "1,3,10,30,60", "batch_size": "1,4"}


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    sweep_ = FULL if args.full else QUICK
    seconds = options.numbers(
        "--audio-seconds", args.audio_seconds or sweep_["audio_seconds"], float, 0, above=True
    )
    batches = options.numbers("--batch-size", args.batch_size or sweep_["batch_size"], int, 1)
    strategies = args.strategy.split(",")
    for s in strategies:
        if s not in STRATEGIES:
            raise GsoptError(f"unknown strategy {s!r}: choose from {', '.join(STRATEGIES)}")
    if args.backend not in BACKENDS:
        raise GsoptError(f"unknown backend {args.backend!r}: choose from {', '.join(BACKENDS)}")
    recipe = load_recipe(one_recipe(args.recipe, "explain")) if args.recipe else None
    out = None
    if args.out:
        out = check_output(args.out, folder=False, inputs=recipe_files([args.recipe or ""]))
    source = args.model or default_model(device.type)
    model = load_target(
        source, device=device, dtype=torch.float32, lora="merged", memory_check=args.memory_check
    )
    recipe_notes = list(apply(model, recipe).report.notes) if recipe is not None else []
    payload = {
        "model": str(source),
        "recipe": args.recipe,
        "backend": args.backend,
        "audio_seconds": seconds,
        "batch": batches,
        "environment": environment(device),
        "notes": recipe_notes,
        "complete": False,
        "stages": [],
    }
    cases = len(strategies) * len(family_of(model).stages) + (not args.no_reference)
    with tqdm(total=cases, desc="explain", unit="case", file=sys.stderr, disable=None) as bar:

        def done(report: StageReport) -> None:  # what finished is kept, if --out is given
            payload["stages"].append(asdict(report))
            if out is not None:
                write_atomic(out, to_json(payload))
            bar.update()

        reports = explain_gsopt(model, seconds, batches, strategies, args.backend, done)
        if not args.no_reference:
            reports += explain_reference(model, seconds, batches, args.backend)
            done(reports[-1])
    payload["complete"] = True
    print(to_json(payload) if args.json else render(reports), end="")
    if out is not None:
        write_atomic(out, to_json(payload))
        print(f"wrote {out}", file=sys.stderr)
    return 0


def add_parser(subparsers, name: str, help: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name,
        help=help,
        description="Compile each stage over a sweep of audio lengths and batch sizes and "
        "report graphs, graph breaks (with their source lines) and every recompile's guard "
        "failures, beside transformers' forward.",
    )
    parser.add_argument(
        "--recipe",
        "--recipes",
        dest="recipe",
        metavar="NAME",
        help="apply this recipe's model changes first (dtype, LoRA, kernels)",
    )
    options.add_model(parser)
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument(
        "--audio-seconds",
        metavar="S,...",
        help=f"sweep of clip lengths (default {QUICK['audio_seconds']}; "
        f"--full: {FULL['audio_seconds']})",
    )
    options.add_batch_size(
        parser,
        f"sweep of batch sizes, a comma list (default {QUICK['batch_size']}; --full: "
        f"{FULL['batch_size']})",
    )
    parser.add_argument(
        "--full", action="store_true", help="the full sweep (about 6 minutes on tiny, 2 cores)"
    )
    parser.add_argument(
        "--strategy", default=",".join(STRATEGIES), help="exact, dynamic, buckets (comma list)"
    )
    parser.add_argument("--backend", default="inductor", help="inductor, aot_eager or eager")
    parser.add_argument("--no-reference", action="store_true", help="skip transformers' side")
    parser.add_argument("--out", metavar="FILE.json", help="also write the report to this file")
    options.add_json(parser)
    options.add_memory_check(parser)
    parser.set_defaults(run=run)
    return parser


__all__ = ["explain_gsopt", "explain_reference"]
