"""`gsopt bench`: sweep recipes x audio length x batch x new tokens x dtype, beside two
transformers peers on the same weights, and write one JSON record (what `gsopt report`
reads).

Decoding is fixed-length (eos ignored) so every row does the same work. Per stage: median
and p90 over the timed repeats, the first call kept apart as warm-up/compile. The decode
roofline counts the bytes one step must read (`decode_step_bytes`, each weight at its stored
size) against the read ceiling measured in the same run.
"""

from __future__ import annotations

import argparse
import math
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from gsopt import runtime
from gsopt.audio.files import sample_audio
from gsopt.audio.frontend import SAMPLE_RATE, LogMelDeltaFrontend, LogMelFrontend, num_audio_tokens
from gsopt.commands import options
from gsopt.commands.options import at_least, recipe_files, recipe_list
from gsopt.engine.drafts import oracle
from gsopt.engine.pipeline import STAGES, prompt_for
from gsopt.engine.quantize import stored_bytes
from gsopt.engine.timing import StageTimer
from gsopt.errors import GsoptError
from gsopt.measure.interleave import Call, interleave, pipeline_runner, stats_ms
from gsopt.model.checkpoint import from_hf_state_dict, load_config, load_model
from gsopt.model.config import hf_model_class, to_hf_config
from gsopt.model.family import family_of, is_variant
from gsopt.model.loader import load_draft_model
from gsopt.model.memory import check_fits
from gsopt.model.tokenizer import prompt_template
from gsopt.recipe import build_pipeline, load_recipe
from gsopt.results import BENCH_SCHEMA, check_output, environment, to_json, write_atomic
from gsopt.runtime import (
    DEFAULT_RECIPE,
    DTYPES,
    default_model,
    resolve_device,
    resolve_dtype,
)

PEERS = ("transformers-eager", "transformers-static-compile")
DEFAULT_BENCH_RECIPES = "eager,static-kv,compile-decoder"


def decode_step_bytes(model, batch: int, cache_len: int) -> int:
    """Bytes one decode step must read: every decoder weight at its stored size (int8 or
    int4 data plus scales and zero points when quantized) but the embedding table (the lm
    head is read whether tied or not), the B embedding rows gathered, and K and V of
    `cache_len` positions in every layer. Activations are ignored (B x emb_dim, tiny)."""
    decoder, config = model.decoder, model.config.decoder
    embedding = decoder.base_model.embedding
    weights = 0
    for module in decoder.modules():
        if module is embedding:
            continue
        for name, tensor in module.named_parameters(recurse=False):
            if name != "plain":  # a oneDNN linear's plain copy: the step reads one of the two
                weights += stored_bytes(tensor)
    itemsize = embedding.weight.element_size()
    kv = (config.kvheads or config.nheads) * config.head_dim
    embedding_rows = batch * config.emb_dim * itemsize
    kv_cache = config.nlayers * 2 * batch * cache_len * kv * itemsize
    return weights + embedding_rows + kv_cache


# Read ceilings are measured on at most this much memory: far past any cache, and cheap.
MAX_CEILING_BYTES = {"cpu": 1 << 30, "cuda": 4 << 30}


class ReadCeiling:
    """The rate at which this device reads memory the way a decode step does: a GEMV over a
    weight of the step's size (and a sum over it), in the row's dtype. Sampled after every
    call, interleaved with the rows it is compared to; the ceiling is the best sample. A step
    whose weights fit in a cache gets a cache-sized ceiling, as it should."""

    def __init__(self, device: torch.device, nbytes: int, dtype: torch.dtype):
        nbytes = min(nbytes, MAX_CEILING_BYTES[device.type])
        cols = 1024
        itemsize = torch.empty((), dtype=dtype).element_size()
        rows = max(1, nbytes // (cols * itemsize))
        self.weight = torch.empty(rows, cols, dtype=dtype, device=device).uniform_(-1, 1)
        self.vector = torch.ones(cols, dtype=dtype, device=device)
        self.device = device
        self.best = 0.0

    def sample(self) -> None:
        for read in (lambda: self.weight @ self.vector, self.weight.sum) * 2:
            timer = StageTimer(self.device)
            with timer("read"):
                read()
            self.best = max(self.best, self.weight.nbytes / timer.times["read"][0])


def roofline(step_bytes: int, step_s: float, ceiling_Bps: float) -> dict[str, float]:
    """Bytes a decode step reads against the measured read ceiling. Reading faster than the
    ceiling is impossible: such a figure is a measuring bug, so it raises."""
    achieved = step_bytes / step_s
    mbu = achieved / ceiling_Bps
    if mbu > 1.0:
        raise RuntimeError(
            f"bug: decode read {achieved / 1e9:.1f} GB/s, above the measured read ceiling "
            f"{ceiling_Bps / 1e9:.1f} GB/s (MBU {100 * mbu:.0f}%)"
        )
    return {
        "bytes_per_step": step_bytes,
        "achieved_GBps": achieved / 1e9,
        "ceiling_GBps": ceiling_Bps / 1e9,
        "mbu": mbu,
        "floor_ms_per_token": 1e3 * step_bytes / ceiling_Bps,
    }


def reference_pair(source: str, device: torch.device, dtype: torch.dtype, with_peer: bool = True):
    """(gsopt model, transformers model or None) holding identical weights. A variant gets
    random transformers weights built on the device, and gsopt's model is made from that
    state dict in memory (no multi-GB save and load); a checkpoint folder is loaded by both.
    The LoRA adapter is left out on both sides."""
    config = load_config(source)
    hf_class = hf_model_class(config)
    if not is_variant(source):
        model = load_model(source, device=device, dtype=dtype, lora="none")
        hf = hf_class.from_pretrained(source, dtype=dtype).to(device) if with_peer else None
        return model, hf.eval() if hf is not None else None
    torch.manual_seed(0)
    with torch.device(device):
        hf = hf_class._from_config(to_hf_config(config), dtype=dtype).eval()
    model = from_hf_state_dict(config, hf.state_dict(), dtype).eval()
    return model, hf if with_peer else None


def ctc_peer_runner(hf, waves):
    """transformers' CTC forward and argmax on gsopt's 5.0 frontend features (its feature
    extractor needs torchaudio, which does not install beside this torch)."""
    device = hf.device
    frontend = LogMelDeltaFrontend().to(device)
    dtype = next(hf.parameters()).dtype
    waves_t = torch.stack(waves).to(device)

    def call(annotate: bool = False) -> Call:
        timer = StageTimer(device)
        with timer("total"), torch.no_grad():
            with timer("frontend"):
                features, _ = frontend(waves_t)
            with timer("encoder"):
                hf(input_features=features.to(dtype)).logits.argmax(-1)
        return Call(dict(timer.times), timer.times.pop("total")[0])

    return call


def clip(seconds: float) -> torch.Tensor:
    """The sample clip tiled (or cropped) to `seconds`."""
    wave = sample_audio()
    n = int(seconds * SAMPLE_RATE)
    return wave.repeat(math.ceil(n / len(wave)))[:n]


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def memory_kind(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated, reset before each call; the max over a row's calls"
    return "process peak RSS (getrusage ru_maxrss): monotonic over the whole run, not per row"


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _summary(calls: list[Call], audio_s: float, tokens: int) -> dict[str, Any]:
    """Stage and end-to-end statistics; calls[0] is the warm-up (compile) call."""
    steady = calls[1:]
    totals = [c.total for c in steady]
    median_s = statistics.median(totals)
    steps = [t for c in steady for t in c.stages.get("decode", [])]
    return {
        "stages": {
            s: stats_ms([c.stage_s(s) for c in steady])
            for s in (*STAGES, "ctc")
            if s in calls[0].stages
        },
        # Per decoder forward after the prompt (a speculative row verifies several tokens in
        # one; with a perfect draft it may need none).
        "decode_ms_per_token": stats_ms(steps) if steps else None,
        "end_to_end": {
            **stats_ms(totals),
            "first_ms": 1e3 * calls[0].total,
            "compile_s": max(0.0, calls[0].total - median_s),
            "rtf": median_s / audio_s,
            "rtfx": audio_s / median_s,
            "tokens_per_s": tokens / median_s,
        },
    }


def recipe_runner(model, recipe_name: str, waves, template, new_tokens: int, **options):
    """A recipe's pipeline as a runner, and the pipeline (its notes and speculation stats).
    A recipe that transforms the model gets a copy, so every row starts from the same model.
    `options`: `draft_model` for apply, `drafts` for each call."""
    pipeline = build_pipeline(model, recipe_name, draft_model=options.get("draft_model"))
    drafts = {"drafts": options["drafts"]} if options.get("drafts") is not None else {}
    return pipeline_runner(pipeline, waves, template, new_tokens, **drafts), pipeline


def row_names(recipes: list[str], accuracies: list[float]) -> list[str]:
    """Each recipe, and for a CTC-drafting speculative recipe also one row per oracle draft
    accuracy, named RECIPE@ACCURACY."""
    names = []
    for name in recipes:
        names.append(name)
        spec = load_recipe(name).speculate
        if spec is not None and spec.kind.from_encoder:
            names += [f"{name}@{accuracy:g}" for accuracy in accuracies]
    return names


class _StepClock:
    """A generate() streamer that timestamps each token: the first put is the prompt, the
    second the prefill's token, each later one a decode step."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stamps: list[float] = []

    def put(self, value) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


def peer_runner(hf, peer: str, waves, template, new_tokens: int):
    """transformers' generate (eager, or static cache + compiled forward) as a callable like
    `recipe_runner`'s. The gsopt log-mel frontend stands in for transformers' feature
    extractor, timed inside the call."""
    from transformers.generation.configuration_utils import CompileConfig

    device = hf.device
    frontend = LogMelFrontend().to(device)
    dtype = next(hf.parameters()).dtype
    ids = torch.stack(
        [prompt_for(num_audio_tokens(len(w)), template, hf.config.audio_token_index) for w in waves]
    ).to(device)
    waves_t = torch.stack(waves).to(device)
    lengths = torch.full((len(waves),), waves_t.shape[1], device=device)
    kwargs: dict[str, Any] = dict(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
    )
    if peer == "transformers-static-compile":
        config = CompileConfig(
            fullgraph=False, mode="reduce-overhead" if device.type == "cuda" else "default"
        )
        config._compile_all_devices = True  # transformers compiles only on accelerators otherwise
        kwargs.update(cache_implementation="static", compile_config=config)

    def call(annotate: bool = False) -> Call:
        clock = _StepClock(device)
        start = time.perf_counter()
        with torch.no_grad():
            features, _ = frontend(waves_t, lengths)
            clock.put(None)
            out = hf.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                input_features=features.to(dtype),
                streamer=clock,
                **kwargs,
            )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        total = time.perf_counter() - start
        s = clock.stamps  # [frontend done, prompt put, prefill token, decode steps...]
        if out.shape[1] - ids.shape[1] != new_tokens:
            raise RuntimeError(f"generated {out.shape[1] - ids.shape[1]} tokens, not {new_tokens}")
        times = {
            "frontend": [s[0] - start],
            "prefill": [s[2] - s[1]],  # encoder + projector + prefill: one forward
            "decode": [b - a for a, b in zip(s[2:], s[3:], strict=False)],
        }
        return Call(times, total)

    return call


def _point_rows(
    model,
    hf,
    peers,
    recipes,
    dtype_name,
    seconds,
    batch,
    new_tokens,
    args,
    device,
    bar,
    draft_model=None,
) -> list[dict[str, Any]]:
    waves = [clip(seconds)] * batch
    ctc = not family_of(model).decoder  # Granite Speech 5.0: no prompt, no decode step
    template = None if ctc else prompt_template(model.config)
    audio_s, tokens = seconds * batch, batch * new_tokens
    prompt_len = cache_len = step_bytes = 0
    if not ctc:
        audio_tokens = num_audio_tokens(len(waves[0]))
        prompt_len = len(prompt_for(audio_tokens, template, model.config.audio_token_id))
        cache_len = prompt_len + new_tokens // 2  # the average position of a decode step
        step_bytes = decode_step_bytes(model, batch, cache_len)
    names = [*peers, *row_names(recipes, args.draft_accuracy)]
    # Oracle drafts come from the clip's own greedy output (random weights make real CTC
    # drafts noise); a fixed seed per accuracy.
    greedy = None
    if any("@" in name for name in names):
        greedy = build_pipeline(model, DEFAULT_RECIPE)(waves, template, new_tokens).tolist()
    rows = {
        name: dict(
            name=name,
            kind="peer" if name in PEERS else "recipe",
            dtype=dtype_name,
            audio_seconds=seconds,
            batch=batch,
            max_new_tokens=new_tokens,
            prompt_tokens=prompt_len,
            error=None,
            notes=[],
        )
        for name in names
    }

    def failed(name: str, e: Exception) -> None:
        """A peer or recipe that cannot run here is a result, not a crash."""
        if name not in PEERS and isinstance(e, GsoptError) and not ctc:
            raise e
        rows[name]["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"

    torch._dynamo.reset()
    runners, pipelines = {}, {}
    for name in names:
        try:
            if name in PEERS and ctc:
                if name != "transformers-eager":
                    raise GsoptError(f"{name}: a CTC model has no generate to compile")
                runners[name] = ctc_peer_runner(hf, waves)
            elif name in PEERS:
                runners[name] = peer_runner(hf, name, waves, template, new_tokens)
            else:
                recipe, _, accuracy = name.partition("@")
                drafts = None
                if accuracy:
                    vocab = model.config.decoder.src_vocab_size
                    drafts = oracle(
                        greedy, float(accuracy), vocab, seed=round(100 * float(accuracy))
                    )
                    rows[name]["draft_accuracy"] = float(accuracy)
                runners[name], pipelines[name] = recipe_runner(
                    model,
                    recipe,
                    waves,
                    template,
                    new_tokens,
                    drafts=drafts,
                    draft_model=draft_model,
                )
                rows[name]["notes"] = list(pipelines[name].stages.report.notes)
        except Exception as e:
            failed(name, e)
    peaks = dict.fromkeys(runners, 0)
    ceiling = ReadCeiling(device, step_bytes, DTYPES[dtype_name]) if step_bytes else None

    def before(name: str) -> None:
        bar.set_postfix_str(f"{name} {dtype_name} {seconds:g}s B={batch} N={new_tokens}")
        _reset_peak(device)

    def after(name: str, call: Call | None) -> None:
        if ceiling is not None:  # beside every call: the same spells of load as the rows see
            ceiling.sample()
        bar.update()
        peaks[name] = max(peaks[name], peak_memory(device))

    calls = interleave(
        runners, args.repeats + 1, before_call=before, after_call=after, on_error=failed
    )
    if ceiling is not None:
        del ceiling.weight  # the memory, not the measurement
    for name, call in runners.items():
        row = rows[name]
        if row["error"] is not None:
            continue
        row.update(_summary(calls[name], audio_s, tokens))
        row["peak_memory_bytes"] = peaks[name]
        if row["decode_ms_per_token"] is not None and not ctc:
            step_s = row["decode_ms_per_token"]["median_ms"] / 1e3
            mine = pipelines[name].model if name in pipelines else model  # quantized, packed
            row["roofline"] = roofline(
                decode_step_bytes(mine, batch, cache_len), step_s, ceiling.best
            )
        pipeline = pipelines.get(name)
        if pipeline is not None and pipeline.stages.plan.speculation is not None:
            # Counts per call; `rows` (each row's decision in the last call) as it is.
            as_is = ("tokens_per_forward", "rows")
            row["speculation"] = {
                key: value if key in as_is else value / len(calls[name])
                for key, value in pipeline.speculation_stats.to_json().items()
            }
        if args.profile is not None and name not in PEERS:
            with torch.profiler.profile() as prof:  # every stage is a named range (gsopt/STAGE)
                call(annotate=True)
            args.profile.mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(args.profile / f"{name}.json"))
    ordered = [rows[name] for name in names]
    add_speedups(ordered)
    return ordered


def add_speedups(rows: list[dict[str, Any]]) -> None:
    """Ratio of end-to-end medians, baseline / row, against each peer and gsopt eager."""
    base = {r["name"]: r["end_to_end"]["median_ms"] for r in rows if r["error"] is None}
    for row in rows:
        if row["error"] is not None:
            continue
        mine = row["end_to_end"]["median_ms"]
        row["speedup"] = {
            f"vs_{ref}": base[ref] / mine if ref in base else None for ref in (*PEERS, "eager")
        }


def _peers(text: str) -> list[str]:
    names = [] if text == "none" else [p for p in text.split(",") if p]
    for name in names:
        if name not in PEERS:
            raise GsoptError(
                f"--peers: unknown peer {name!r}; choose from {', '.join(PEERS)}, none"
            )
    return names


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    source = args.model or default_model(device.type)
    dtypes = (args.dtype or runtime.dtype_name(resolve_dtype(None, device))).split(",")
    for name in dtypes:
        resolve_dtype(name, device)
    recipes = recipe_list(args.recipe, DEFAULT_BENCH_RECIPES)
    # unknown names fail before any model is built
    options.warn_unused_draft(args, [load_recipe(name) for name in recipes], "bench")
    at_least("--repeats", args.repeats, 1)
    out = check_output(args.out, folder=False, inputs=recipe_files(recipes))
    if args.profile is not None:
        args.profile = check_output(args.profile, folder=True, flag="--profile")
    config = load_config(source)
    peers = _peers(args.peers)
    seconds = options.numbers("--audio-seconds", args.audio_seconds, float, 0.1)
    batches = options.numbers("--batch-size", args.batch_size, int, 1)
    new_tokens = options.numbers("--max-new-tokens", args.max_new_tokens, int, 1)
    template = prompt_template(config) if family_of(config).decoder else []
    if not template:  # a CTC model has a forward to time, no generate to compile
        peers = [p for p in peers if p == "transformers-eager"]
    for s, n in [(max(seconds), max(new_tokens))] if template else []:
        positions = len(template) - 1 + config.audio_tokens(int(s * SAMPLE_RATE)) + n
        if positions > config.decoder.max_expected_seq_len:
            raise GsoptError(
                f"--audio-seconds {s:g} with --max-new-tokens {n} needs {positions} decoder "
                f"positions; this model has {config.decoder.max_expected_seq_len}: use "
                "shorter audio or fewer new tokens"
            )
    points = [(s, b, n) for s in seconds for b in batches for n in new_tokens]
    accuracy = args.draft_accuracy
    args.draft_accuracy = (
        options.numbers("--draft-accuracy", accuracy, float, 0.0) if accuracy else []
    )
    if any(a > 1 for a in args.draft_accuracy):
        raise GsoptError("--draft-accuracy: every value must be at most 1")
    per_point = len(row_names(recipes, args.draft_accuracy)) + len(peers)
    rows: list[dict[str, Any]] = []
    result = _record(args, device, source, dtypes, recipes, seconds, batches, new_tokens, peers)
    for dtype_name in dtypes if args.memory_check else []:  # gsopt's model, transformers' too
        copies = 1 + bool(peers)
        beams = max(load_recipe(name).num_beams for name in recipes)
        check_fits(source, config, DTYPES[dtype_name], device, copies, rows=max(batches) * beams)
    calls = len(dtypes) * len(points) * per_point * (args.repeats + 1)
    with tqdm(total=calls, file=sys.stderr, desc="bench", unit="call") as bar:
        for dtype_name in dtypes:
            model, hf = reference_pair(source, device, DTYPES[dtype_name], with_peer=bool(peers))
            draft = None
            if args.draft_model is not None:
                draft = load_draft_model(
                    args.draft_model, config, device=device, dtype=DTYPES[dtype_name]
                )
            for s, b, n in points:
                rows += _point_rows(
                    model, hf, peers, recipes, dtype_name, s, b, n, args, device, bar, draft
                )
                write_atomic(out, to_json({**result, "rows": rows}))  # what finished is kept
            del model, hf, draft
    result.update(complete=True, rows=rows)
    write_atomic(out, to_json(result))
    if args.json:
        print(to_json(result), end="")
    print(f"wrote {out} ({len(rows)} rows)", file=sys.stderr)
    return 0


def _record(args, device, source, dtypes, recipes, seconds, batches, new_tokens, peers):
    """The bench record, rows to come: written after every sweep point, complete at the end."""
    return {
        "schema": BENCH_SCHEMA,
        "environment": environment(device),
        "settings": {
            "model": str(source),
            "dtypes": dtypes,
            "recipes": recipes,
            "audio_seconds": seconds,
            "batch": batches,
            "max_new_tokens": new_tokens,
            "repeats": args.repeats,
            "warmup_calls": 1,
            "order": "interleaved: each round calls every row of a sweep point once",
            "peers": peers,
            "decoding": "fixed length: eos ignored (gsopt stop_at_eos=False, transformers "
            "min_new_tokens=max_new_tokens)",
            "lora": "none on both sides (transformers' model is built without the adapter)",
            "audio": "bundled sample clip tiled/cropped to each length; batch = B copies",
        },
        "read_ceiling": "best of a GEMV and a sum over a weight the size of the step's "
        "bytes (capped at 1 GiB on CPU, 4 GiB on CUDA), sampled after every call, in the "
        "row's dtype",
        "memory_kind": memory_kind(device),
        "complete": False,
        "rows": [],
    }


def add_parser(subparsers, name: str, help: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name,
        help=help,
        description="Time recipes x audio length x batch size x new tokens x dtype, rows "
        "interleaved, beside transformers baselines on the same weights (by default two: "
        "eager generate, and static cache + compile; for a variant name the weights are "
        "random and built in memory), and write one JSON record for `gsopt report`.",
    )
    options.add_recipe(parser, default=DEFAULT_BENCH_RECIPES)
    options.add_model(parser)
    parser.add_argument(
        "--audio-seconds", default="10", metavar="S,...", help="comma list, e.g. 3,10,30"
    )
    options.add_batch_size(parser, "comma list, e.g. 1,8,64", default="1")
    parser.add_argument(
        "--max-new-tokens", default="64", metavar="N,...", help="comma list, e.g. 64,128"
    )
    options.add_device(parser, dtype_list=True)
    parser.add_argument("--out", default="bench.json", metavar="FILE.json", help="file to write")
    options.add_json(parser)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs after one warm-up")
    parser.add_argument(
        "--profile", type=Path, metavar="DIR", help="folder for a Chrome trace per recipe"
    )
    parser.add_argument(
        "--peers",
        default=",".join(PEERS),
        help="transformers baselines timed on the same weights: a comma list of "
        f"{', '.join(PEERS)}, or none",
    )
    parser.add_argument(
        "--no-peers", dest="peers", action="store_const", const="none", help="--peers none"
    )
    parser.add_argument(
        "--draft-accuracy",
        metavar="LIST",
        help="for each CTC-drafting speculative recipe, also rows with oracle drafts: the "
        "clip's own greedy output with this fraction of tokens kept (comma list, e.g. "
        "1.0,0.9,0.7,0)",
    )
    options.add_draft_model(parser)
    options.add_memory_check(parser)
    parser.set_defaults(run=run)
    return parser
