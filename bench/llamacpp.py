"""The llama.cpp anchor: gsopt's decoder recipes against llama.cpp on the same weights.

The Granite LM of a Granite Speech checkpoint or variant (default `cpu-real-width`, random
weights) is saved as a transformers `GraniteForCausalLM` folder, converted to GGUF by
llama.cpp's own `convert_hf_to_gguf.py` (f32), checked against transformers' logits on the
same tokens, and quantized by llama.cpp (`llama_model_quantize` through llama-cpp-python) to
f16, q8_0, q4_0 and q4_K_M. Then one interleaved run times, at batch 1 on `--threads` threads:

- llama.cpp at each precision: a prompt of the length 10 s of audio gives (172 tokens on
  `cpu-real-width`) in one `llama_decode`, then `--max-new-tokens` - 1 greedy single-token
  steps;
- gsopt's recipes on the same weights, one per precision: `compile-decoder` (fp32), `bf16`,
  `int8-decoder`, `int4-decoder` (beside both q4_0 and q4_K_M). Each runs the decoder stages
  of its own pipeline (prefill of the same prompt length, then the same greedy steps) through
  `gsopt.engine.generate` on audio rows embedded once beforehand, timed by gsopt's
  `StageTimer` as `gsopt bench` times its `prefill` and `decode` stages.

Round r calls every engine once (`gsopt.measure.interleave`; round 0 is the warm-up and
compiles); decode ms/token is the median over every timed step, prompt tokens/s the prompt
length over the median prefill; gsopt/llama.cpp ratios are taken per round (each engine's
median step in that round) and given with their 10th-90th percentiles. Bytes per token:
gsopt's `decode_step_bytes` (every decoder weight as stored but the embedding table, the
head read tied or not, the embedding row, K and V); for llama.cpp the same count over the
GGUF's tensors (the tied `token_embd` is the head, so it counts whole) plus its f16 KV cache.

Tokenizer. A variant has no tokenizer file; gsopt's synthetic one (a GPT-2-style byte-level
BPE without merges) is refused by the converter (its pre-tokenizer hash is in no list) and
would be by llama.cpp (a BPE vocabulary needs merges). The bench saves the same vocabulary,
every id where gsopt's has it (the 256 bytes, the filler words, `<|end_of_text|>` and
`<|audio|>`), in the Llama/SentencePiece form: BPE with byte fallback, `<0xNN>` byte tokens
and `▁` for a space, which the converter reads through its own Llama-HF path (`LlamaHfVocab`,
the path of Llama 2's tokenizer.json; no hash to match, nothing of the converter patched).
Both engines are fed token ids, so the tokenizer's form changes no number. A checkpoint
folder's own tokenizer files are copied as they are (Granite's is in the converter's list).

The converter. `--llama-cpp-source` names a llama.cpp tree (`convert_hf_to_gguf.py` at its
root) or a llama-cpp-python sdist (a folder or the .tar.gz; the converter is in
`vendor/llama.cpp`). Without it the bench fetches the sdist of the installed llama-cpp-python
(`pip download llama-cpp-python==VERSION --no-deps --no-binary :all:`) into the work folder
and unpacks it once, so the converter matches the library that loads its files.

    CMAKE_ARGS="-DGGML_NATIVE=ON" pip install -e ".[bench]"
    python bench/llamacpp.py --model cpu-real-width --out bench/results/llamacpp-cpu-real-width

writes OUT.json, OUT.md and OUT.png.
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from gsopt.errors import GsoptError

# llama.cpp precision -> the gsopt recipe timed beside it.
PAIRS = {
    "f32": "compile-decoder",
    "f16": "bf16",
    "q8_0": "int8-decoder",
    "q4_0": "int4-decoder",
    "q4_K_M": "int4-decoder",
}
FTYPES = {"f16": "LLAMA_FTYPE_MOSTLY_F16", "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0"}
FTYPES |= {"q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}
# The f32 GGUF against transformers' fp32 logits (f32 KV cache): a conversion error (a scale,
# the rope, a permuted weight) moves logits by tens of percent; summation order by ~1e-6.
F32_TOLERANCE = 1e-3
TOKENIZER_EXTRAS = ("special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt")
TOKENIZER_EXTRAS += ("chat_template.jinja", "chat_template.json", "added_tokens.json")
GGML_TYPE_F32 = 0
LLAMA = "llama.cpp"


# ---------------------------------------------------------------- the converter


def _sdist_root(folder: Path) -> Path | None:
    """The llama.cpp tree inside a llama.cpp checkout or an unpacked llama-cpp-python sdist."""
    for root in (folder, folder / "vendor" / "llama.cpp"):
        if (root / "convert_hf_to_gguf.py").is_file():
            return root
    return None


def _unpack(archive: Path, into: Path) -> Path:
    """An sdist .tar.gz unpacked under `into` (once); its llama.cpp tree."""
    name = archive.name.removesuffix(".tar.gz")
    target = into / name
    if _sdist_root(target) is None:
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(into, filter="data")
        except (tarfile.TarError, OSError) as e:
            raise GsoptError(f"{archive}: cannot unpack ({e})") from None
    root = _sdist_root(target)
    if root is None:
        raise GsoptError(f"{archive}: holds no vendor/llama.cpp/convert_hf_to_gguf.py")
    return root


def find_converter(source: Path | None, work: Path) -> Path:
    """The llama.cpp tree whose convert_hf_to_gguf.py converts (see the module docstring)."""
    if source is not None:
        if source.is_dir():
            root = _sdist_root(source)
            if root is None:
                raise GsoptError(
                    f"--llama-cpp-source {source}: no convert_hf_to_gguf.py there or in "
                    "vendor/llama.cpp; name a llama.cpp tree or a llama-cpp-python sdist"
                )
            return root
        if source.is_file() and source.name.endswith(".tar.gz"):
            return _unpack(source, work / "sdist")
        raise GsoptError(f"--llama-cpp-source {source}: not a folder or an sdist .tar.gz")
    version = metadata.version("llama-cpp-python")
    folder = work / "sdist"
    archive = folder / f"llama_cpp_python-{version}.tar.gz"
    if not archive.exists():
        folder.mkdir(parents=True, exist_ok=True)
        print(f"fetching the llama-cpp-python {version} sdist for its converter", file=sys.stderr)
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}"]
            + ["--no-deps", "--no-binary", ":all:", "-d", str(folder)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0 or not archive.exists():
            last = (done.stderr.strip().splitlines() or ["no archive written"])[-1]
            raise GsoptError(
                f"cannot fetch the llama-cpp-python {version} sdist ({last}); pass "
                "--llama-cpp-source with a llama.cpp tree or the sdist"
            )
    return _unpack(archive, folder)


# ---------------------------------------------------------------- the language model


def twin_tokenizer(config):
    """gsopt's synthetic vocabulary in the Llama/SentencePiece form the converter reads (see
    the module docstring): the same id for every byte, filler word and special token."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    from gsopt.model.tokenizer import AUDIO_TOKEN, END_OF_TEXT, _filler_word

    vocab_size = config.decoder.src_vocab_size
    specials = {config.eos_token_id: END_OF_TEXT, config.audio_token_id: AUDIO_TOKEN}
    free = [i for i in range(vocab_size) if i not in specials]
    vocab = {f"<0x{byte:02X}>": free[byte] for byte in range(256)}
    vocab |= {"\u2581" + _filler_word(n): i for n, i in enumerate(free[256:])}
    vocab |= {token: i for i, token in specials.items()}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    backend.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    backend.add_special_tokens([AddedToken(token, special=True) for token in specials.values()])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=END_OF_TEXT)


def save_language_model(hf, config, source: str, folder: Path):
    """transformers' `GraniteForCausalLM` holding `hf`'s LM weights, saved to `folder` with a
    tokenizer the converter accepts; returns the model (the logits reference)."""
    from transformers import GraniteForCausalLM

    from gsopt.model.family import is_variant
    from gsopt.model.tokenizer import TOKENIZER_FILES

    text = hf.config.text_config
    if text.model_type != "granite":
        raise GsoptError(f"{source}: its decoder is {text.model_type!r}, not a Granite LM")
    lm = GraniteForCausalLM._from_config(text, dtype=torch.float32).eval()
    lm.model.load_state_dict(hf.model.language_model.state_dict())
    if not text.tie_word_embeddings:
        lm.lm_head.load_state_dict(hf.lm_head.state_dict())
    if not torch.equal(lm.lm_head.weight, hf.lm_head.weight):
        raise RuntimeError("bug: the saved LM's head is not the speech model's")
    shutil.rmtree(folder, ignore_errors=True)
    lm.save_pretrained(folder)
    if is_variant(source):
        twin_tokenizer(config).save_pretrained(folder)
    else:
        names = [*TOKENIZER_FILES, *TOKENIZER_EXTRAS]
        for name in names:
            if (Path(source) / name).exists():
                shutil.copy(Path(source) / name, folder / name)
    return lm


def convert(llama_dir: Path, lm_dir: Path, out: Path) -> None:
    """llama.cpp's converter, f32, in a subprocess (it puts its own gguf-py first)."""
    command = [sys.executable, str(llama_dir / "convert_hf_to_gguf.py"), str(lm_dir)]
    command += ["--outtype", "f32", "--outfile", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not out.exists():
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"convert_hf_to_gguf.py failed ({done.returncode}):\n{tail}")


def quantize(llama_cpp, f32: Path, out: Path, precision: str, threads: int) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPES[precision])
    params.nthread = threads
    status = llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), params)
    if status != 0 or not out.exists():
        raise RuntimeError(f"llama_model_quantize to {precision} failed (status {status})")


def gguf_tensors(path: Path) -> dict[str, tuple[str, int]]:
    """Each tensor's type name and bytes in a GGUF file."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    return {t.name: (t.tensor_type.name, int(t.n_bytes)) for t in reader.tensors}


def gguf_step_bytes(tensors: dict[str, tuple[str, int]], config, cache_len: int) -> int:
    """What one llama.cpp decode step reads, counted as gsopt's `decode_step_bytes` counts:
    every tensor but the embedding table (which is the head when there is no output.weight),
    one embedding row at the table's rate, K and V of `cache_len` positions in f16."""
    dec = config.decoder
    tied = "output.weight" not in tensors
    weights = sum(n for name, (_, n) in tensors.items() if tied or name != "token_embd.weight")
    row = tensors["token_embd.weight"][1] // dec.src_vocab_size
    kv = dec.nlayers * 2 * cache_len * (dec.kvheads or dec.nheads) * dec.head_dim * 2
    return weights + row + kv


# ---------------------------------------------------------------- llama.cpp


class LlamaEngine:
    """One GGUF on llama.cpp through llama-cpp-python's C API, with llama.cpp's own context
    defaults (flash attention auto, f16 KV cache) but for the threads and sizes."""

    def __init__(self, llama_cpp, path: Path, n_ctx: int, threads: int, kv_f32: bool = False):
        self.lib = llama_cpp
        params = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        ctx_params = llama_cpp.llama_context_default_params()
        ctx_params.n_ctx = n_ctx
        ctx_params.n_batch = ctx_params.n_ubatch = n_ctx
        ctx_params.n_threads = ctx_params.n_threads_batch = threads
        ctx_params.no_perf = True
        if kv_f32:
            ctx_params.type_k = ctx_params.type_v = GGML_TYPE_F32
        self.ctx = llama_cpp.llama_init_from_model(self.model, ctx_params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not make a context for {path}")
        vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)

    def clear(self) -> None:
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)

    def _decode(self, tokens: list[int], all_logits: bool) -> np.ndarray:
        lib, n = self.lib, len(tokens)
        if not all_logits:  # positions follow the cache; logits of the last token only
            array = (lib.llama_token * n)(*tokens)
            status = lib.llama_decode(self.ctx, lib.llama_batch_get_one(array, n))
            if status != 0:
                raise RuntimeError(f"llama_decode failed (status {status})")
            logits = lib.llama_get_logits_ith(self.ctx, -1)
            return np.ctypeslib.as_array(logits, shape=(self.n_vocab,))
        batch = lib.llama_batch_init(n, 0, 1)
        try:
            start = lib.llama_memory_seq_pos_max(lib.llama_get_memory(self.ctx), 0) + 1
            for i, token in enumerate(tokens):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, start + i, 1
                batch.seq_id[i][0], batch.logits[i] = 0, 1
            batch.n_tokens = n
            status = lib.llama_decode(self.ctx, batch)
            if status != 0:
                raise RuntimeError(f"llama_decode failed (status {status})")
            logits = lib.llama_get_logits(self.ctx)
            return np.ctypeslib.as_array(logits, shape=(n, self.n_vocab)).copy()
        finally:
            lib.llama_batch_free(batch)

    def greedy(self, tokens: list[int]) -> int:
        return int(self._decode(tokens, False).argmax())

    def logits(self, prompt: list[int], steps: int) -> tuple[np.ndarray, list[int]]:
        """Logits after every prompt position (one batch) and after each of `steps` greedy
        single-token steps; the tokens chosen."""
        self.clear()
        rows = [self._decode(prompt, True)]
        chosen = [int(rows[0][-1].argmax())]
        for _ in range(steps):
            rows.append(self._decode([chosen[-1]], True))
            chosen.append(int(rows[-1][-1].argmax()))
        return np.concatenate(rows), chosen

    def close(self) -> None:
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)


def llama_runner(engine: LlamaEngine, prompt: list[int], new_tokens: int):
    """A runner (`gsopt.measure.interleave`) for one GGUF: the prompt in one decode
    (`prefill`), then new_tokens - 1 single-token greedy steps (`decode`, each timed)."""
    from gsopt.measure.interleave import Call

    def call(annotate: bool = False) -> Call:
        engine.clear()
        start = time.perf_counter()
        token = engine.greedy(prompt)
        mark = time.perf_counter()
        times = {"prefill": [mark - start], "decode": []}
        tokens = [token]
        for _ in range(new_tokens - 1):
            token = engine.greedy([token])
            now = time.perf_counter()
            times["decode"].append(now - mark)
            mark = now
            tokens.append(token)
        return Call(times, mark - start, torch.tensor([tokens]))

    return call


# ---------------------------------------------------------------- gsopt


def decoder_runner(pipeline, waves, template: list[int], new_tokens: int):
    """`pipeline_runner` without the audio stages: the recipe's own prefill and decode
    stages through its KV cache's generate, on audio rows embedded once here, timed by the
    same StageTimer (stages `prefill` and `decode`, one entry per step)."""
    from gsopt.engine.timing import StageTimer
    from gsopt.measure.interleave import Call

    stages = pipeline.stages
    if stages.plan.speculation is not None or stages.plan.num_beams != 1:
        raise GsoptError(
            "the anchor times greedy decoding; a speculative or beam recipe has no pair"
        )
    with torch.no_grad():
        audio = pipeline.embed_audio(waves, stages)[0]
    prompts = pipeline.prompts(waves, template)

    def call(annotate: bool = False) -> Call:
        timer = StageTimer(pipeline.device, annotate)
        with timer("total"):
            tokens = stages.plan.cache.generate(
                pipeline.model, prompts, audio, new_tokens, stages, stop_at_eos=False, timer=timer
            )
        total = timer.times.pop("total")[0]
        return Call(dict(timer.times), total, tokens)

    return call, len(prompts[0])


def gsopt_logits(model, ids: list[int]) -> np.ndarray:
    """gsopt's eager decoder (FMS, static cache) on text ids: the logits after every one."""
    from gsopt.engine.generate import prefill, setup_cache

    tokens = torch.tensor([ids])
    cache = setup_cache(model, 1, len(ids))
    with torch.no_grad():
        out = prefill(model, tokens, torch.arange(len(ids))[None], None, cache.layers)
    return out[0].float().numpy()


# ---------------------------------------------------------------- the check


def logit_error(mine: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    diff = mine.astype(np.float64) - ref.astype(np.float64)
    return {
        "max_abs_diff": float(np.abs(diff).max()),
        "max_abs_ref": float(np.abs(ref).max()),
        "relative_rms": float(np.sqrt((diff**2).mean() / (ref.astype(np.float64) ** 2).mean())),
        "argmax_agreement": float((mine.argmax(-1) == ref.argmax(-1)).mean()),
    }


@dataclass
class Reference:
    lm: object
    ids: list[int]

    def logits(self, extra: list[int]) -> np.ndarray:
        with torch.no_grad():
            out = self.lm(torch.tensor([self.ids + extra])).logits
        return out[0].float().numpy()


# ---------------------------------------------------------------- results


def _round_medians(calls, stage: str) -> list[float]:
    return [statistics.median(c.stages[stage]) for c in calls[1:]]


def summarize(calls, prompt_len: int, step_bytes: int, ceiling: float) -> dict:
    from gsopt.commands.bench import roofline
    from gsopt.measure.interleave import stats_ms

    steady = calls[1:]
    steps = [t for c in steady for t in c.stages["decode"]]
    decode = stats_ms(steps)
    prefill = stats_ms([c.stages["prefill"][0] for c in steady])
    row = {
        "decode_ms_per_token": decode,
        "prefill_ms": prefill,
        "prompt_tokens_per_s": prompt_len / (prefill["median_ms"] / 1e3),
        "bytes_per_token": step_bytes,
        "achieved_GBps": step_bytes / (decode["median_ms"] / 1e3) / 1e9,
        "first_call_ms": 1e3 * calls[0].total,
        "round_decode_medians_ms": [1e3 * t for t in _round_medians(calls, "decode")],
        "round_prefill_ms": [1e3 * t for t in _round_medians(calls, "prefill")],
    }
    try:
        row["roofline"] = roofline(step_bytes, decode["median_ms"] / 1e3, ceiling)
    except RuntimeError as e:  # a figure above the ceiling: recorded, not hidden
        row["roofline"] = {"error": str(e)}
    return row


def markdown(result: dict) -> str:
    env, s = result["environment"], result["settings"]
    lines = [
        f"# llama.cpp anchor: {s['model']} decoder, batch 1, {s['threads']} threads",
        "",
        f"{env['device']}; torch {env['torch']}, transformers {env['transformers']}, "
        f"ibm-fms {env['ibm-fms']}, llama-cpp-python {env['llama-cpp-python']}, gguf "
        f"{env['gguf']}; commit {env['commit']}; {env['date']}.",
        "",
        f"llama.cpp system info: `{env['llama.cpp system info']}`",
        "",
        f"Prompt {s['prompt_tokens']} tokens (the prompt of {s['audio_seconds']:g} s of audio), "
        f"then {s['max_new_tokens'] - 1} greedy single-token steps; {s['rounds']} timed rounds "
        "after one warm-up, engines interleaved within each round; medians. gsopt/llama.cpp: "
        "per-round ratio of the decode medians, median (p10-p90); above 1 gsopt is slower.",
        "",
        "| precision | llama.cpp decode ms/token | gsopt decode ms/token | gsopt/llama.cpp | "
        "llama.cpp prompt tok/s | gsopt prompt tok/s | llama.cpp bytes/token | "
        "gsopt bytes/token |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for pair in result["pairs"]:
        llama, mine = result["rows"][pair["llama.cpp"]], result["rows"][pair["gsopt"]]
        ratio = pair["decode_ratio_gsopt_over_llamacpp"]
        lines.append(
            f"| {pair['precision']} / {pair['recipe']} | "
            f"{llama['decode_ms_per_token']['median_ms']:.2f} | "
            f"{mine['decode_ms_per_token']['median_ms']:.2f} | "
            f"{ratio['median']:.2f} ({ratio['p10']:.2f}-{ratio['p90']:.2f}) | "
            f"{llama['prompt_tokens_per_s']:.0f} | {mine['prompt_tokens_per_s']:.0f} | "
            f"{llama['bytes_per_token'] / 1e6:.0f} MB | {mine['bytes_per_token'] / 1e6:.0f} MB |"
        )
    lines += [
        "",
        "Achieved read rate (bytes/token over the median step) against the best read of a "
        f"step-sized fp32 GEMV or sum sampled after every call ({result['read_ceiling_GBps']:.1f}"
        " GB/s):",
        "",
        "| row | GB/s | MBU | p90 decode ms | first (warm-up) call ms |",
        "|---|---|---|---|---|",
    ]
    for name, row in result["rows"].items():
        mbu = row["roofline"].get("mbu")
        lines.append(
            f"| {name} | {row['achieved_GBps']:.1f} | "
            f"{'-' if mbu is None else f'{100 * mbu:.0f}%'} | "
            f"{row['decode_ms_per_token']['p90_ms']:.2f} | {row['first_call_ms']:.0f} |"
        )
    lines += [
        "",
        f"Logits against transformers' fp32 `GraniteForCausalLM` on {s['check_tokens']} random "
        f"prompt tokens and {s['check_steps']} greedy steps (llama.cpp: the prompt in one "
        "batch, then single-token steps):",
        "",
        "| engine | max abs diff | max abs logit | relative RMS | argmax agreement |",
        "|---|---|---|---|---|",
    ]
    for name, err in result["logits_check"].items():
        lines.append(
            f"| {name} | {err['max_abs_diff']:.2e} | {err['max_abs_ref']:.2f} | "
            f"{err['relative_rms']:.2e} | {100 * err['argmax_agreement']:.1f}% |"
        )
    lines += ["", "GGUF tensor types (llama.cpp's choices):", ""]
    for precision, info in result["gguf"].items():
        kinds = ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in info["bytes_by_type"].items())
        head = info["head_type"]
        lines.append(f"- {precision}: {info['file_bytes'] / 1e6:.1f} MB file; {kinds}; head {head}")
    return "\n".join(lines) + "\n"


def chart(result: dict) -> bytes:
    """Decode ms/token and prompt tokens/s per precision, llama.cpp beside gsopt."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = result["pairs"]
    labels = [f"{p['precision']} / {p['recipe']}" for p in pairs]
    fig, axes = plt.subplots(1, 2, figsize=(11, 1.6 + 0.55 * len(pairs)))
    height = 0.38
    prompt = result["settings"]["prompt_tokens"]
    for ax, key, title in (
        (axes[0], "decode", "decode ms/token (median; lower is faster)"),
        (axes[1], "prompt", f"prompt tokens/s ({prompt} tokens; higher is faster)"),
    ):
        for i, engine in enumerate(("llama.cpp", "gsopt")):
            rows = [result["rows"][p[engine]] for p in pairs]
            values = [
                r["decode_ms_per_token"]["median_ms"]
                if key == "decode"
                else r["prompt_tokens_per_s"]
                for r in rows
            ]
            bars = ax.barh(
                [j + i * height for j in range(len(pairs))], values, height, label=engine
            )
            ax.bar_label(bars, fmt="%.1f" if key == "decode" else "%.0f", fontsize=8)
        ax.set_yticks([j + height / 2 for j in range(len(pairs))])
        ax.set_yticklabels(labels, fontsize=9)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=9)
        ax.margins(x=0.15)
    axes[0].legend(fontsize=9, loc="lower right")
    s = result["settings"]
    fig.suptitle(
        f"{s['model']} decoder, batch 1, {s['threads']} threads: llama.cpp vs gsopt on the same "
        f"weights\n{result['environment']['device']}",
        fontsize=9,
    )
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


# ---------------------------------------------------------------- main


def _llama_cpp():
    try:
        import gguf  # noqa: F401
        import llama_cpp
        from llama_cpp._logger import set_verbose
    except ImportError as e:
        raise GsoptError(
            f"{e.name} is not installed: CMAKE_ARGS=\"-DGGML_NATIVE=ON\" pip install -e '.[bench]'"
        ) from None
    set_verbose(False)  # llama.cpp's own log: errors only
    return llama_cpp


def run(args: argparse.Namespace) -> dict:
    from gsopt.commands.bench import ReadCeiling, clip, decode_step_bytes, reference_pair
    from gsopt.measure.interleave import interleave, ratio_spread
    from gsopt.model.checkpoint import load_config
    from gsopt.model.family import family_of
    from gsopt.model.tokenizer import prompt_template
    from gsopt.recipe import build_pipeline, load_recipe
    from gsopt.results import environment

    llama_cpp = _llama_cpp()
    config = load_config(args.model)
    if not family_of(config).decoder:
        raise GsoptError(f"{args.model}: a CTC model has no decoder to compare")
    precisions = args.precisions
    for p in precisions:
        if p not in PAIRS:
            raise GsoptError(f"--precisions: unknown {p!r}; choose from {', '.join(PAIRS)}")
    recipes = list(dict.fromkeys(PAIRS[p] for p in precisions))
    for name in recipes:
        load_recipe(name)  # a missing recipe fails before any model is built
    name = Path(args.model).name
    work = (args.work or Path.home() / ".cache" / "gsopt" / "llamacpp") / name
    work.mkdir(parents=True, exist_ok=True)
    llama_dir = find_converter(args.llama_cpp_source, work.parent)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    waves = [clip(args.seconds)]
    template = prompt_template(config, args.model)

    # the weights: one transformers model, gsopt's from its state dict
    model, hf = reference_pair(args.model, device, torch.float32)
    lm_dir = work / "hf-lm"
    reference_lm = save_language_model(hf, config, args.model, lm_dir)
    del hf
    ggufs = {"f32": work / "decoder-f32.gguf"}
    print(f"converting {lm_dir} with {llama_dir / 'convert_hf_to_gguf.py'}", file=sys.stderr)
    convert(llama_dir, lm_dir, ggufs["f32"])
    llama_cpp.llama_backend_init()
    for p in precisions:
        if p != "f32":
            ggufs[p] = work / f"decoder-{p}.gguf"
            quantize(llama_cpp, ggufs["f32"], ggufs[p], p, args.threads)

    # gsopt's pipelines (compiled in the warm-up round), each on its own copy if it changes it
    runners, pipelines = {}, {}
    prompt_len = 0
    for recipe in recipes:
        pipelines[recipe] = build_pipeline(model, recipe)
        runners[f"gsopt {recipe}"], prompt_len = decoder_runner(
            pipelines[recipe], waves, template, args.max_new_tokens
        )
    cache_len = prompt_len + args.max_new_tokens // 2  # the average position of a step
    n_ctx = 256 * math.ceil((prompt_len + args.max_new_tokens + args.check_steps + 1) / 256)

    # the check: the f32 GGUF (f32 KV cache) and every GGUF as timed against transformers
    generator = torch.Generator().manual_seed(0)
    vocab = config.decoder.src_vocab_size
    # random text ids; never the audio placeholder, which gsopt's embedding treats apart
    ids = torch.randint(0, vocab - 1, (prompt_len,), generator=generator)
    ids = (ids + (ids >= config.audio_token_id).long()).tolist()
    reference = Reference(reference_lm, ids)
    check = {}
    strict = LlamaEngine(llama_cpp, ggufs["f32"], n_ctx, args.threads, kv_f32=True)
    got, chosen = strict.logits(ids, args.check_steps)
    strict.close()
    ref = reference.logits(chosen[:-1])
    check["llama.cpp f32 (f32 KV cache)"] = logit_error(got, ref)
    check["gsopt eager fp32 (FMS), prompt positions"] = logit_error(
        gsopt_logits(model, ids), ref[: len(ids)]
    )
    bad = {k: v for k, v in check.items() if not v["relative_rms"] < F32_TOLERANCE}
    if bad:
        raise SystemExit(
            "FAILED: logits differ from transformers' beyond a relative RMS of "
            f"{F32_TOLERANCE}: {bad}"
        )
    engines = {}
    for p in precisions:
        engines[p] = LlamaEngine(llama_cpp, ggufs[p], n_ctx, args.threads)
        got, chosen = engines[p].logits(ids, args.check_steps)
        check[f"llama.cpp {p}"] = logit_error(got, reference.logits(chosen[:-1]))
    del reference, reference_lm
    for key, value in check.items():
        print(f"logits {key}: relative RMS {value['relative_rms']:.2e}", file=sys.stderr)

    llama_prompt = ids  # the same length as gsopt's prompt; ids do not change the work
    for p in precisions:
        runners[f"{LLAMA} {p}"] = llama_runner(engines[p], llama_prompt, args.max_new_tokens)
    tensors = {p: gguf_tensors(path) for p, path in ggufs.items()}
    step_bytes = {
        f"{LLAMA} {p}": gguf_step_bytes(tensors[p], config, cache_len) for p in precisions
    }
    for recipe in recipes:
        step_bytes[f"gsopt {recipe}"] = decode_step_bytes(pipelines[recipe].model, 1, cache_len)
    # engines alternate within each round: llama.cpp p, gsopt's pair, the next p...
    order = []
    for p in precisions:
        order += [f"{LLAMA} {p}", f"gsopt {PAIRS[p]}"]
    runners = {name: runners[name] for name in dict.fromkeys(order)}
    ceiling = ReadCeiling(device, max(step_bytes.values()), torch.float32)
    total = len(runners) * (args.rounds + 1)
    done = 0

    def after(name, call) -> None:
        nonlocal done
        ceiling.sample()
        done += 1
        if call is not None:
            print(
                f"[{done}/{total}] {name}: prefill {1e3 * call.stages['prefill'][0]:.0f} ms, "
                f"decode {1e3 * statistics.median(call.stages['decode']):.2f} ms/token",
                file=sys.stderr,
            )

    calls = interleave(runners, args.rounds + 1, after_call=after)
    del ceiling.weight
    rows = {n: summarize(calls[n], prompt_len, step_bytes[n], ceiling.best) for n in runners}
    for recipe, pipeline in pipelines.items():
        rows[f"gsopt {recipe}"]["notes"] = list(pipeline.stages.report.notes)
    pairs = []
    for p in precisions:
        llama_name, mine = f"{LLAMA} {p}", f"gsopt {PAIRS[p]}"
        pairs.append(
            {
                "precision": p,
                "llama.cpp": llama_name,
                "gsopt": mine,
                "recipe": PAIRS[p],
                "decode_ratio_gsopt_over_llamacpp": ratio_spread(
                    _round_medians(calls[mine], "decode"),
                    _round_medians(calls[llama_name], "decode"),
                ),
                "prefill_ratio_gsopt_over_llamacpp": ratio_spread(
                    _round_medians(calls[mine], "prefill"),
                    _round_medians(calls[llama_name], "prefill"),
                ),
            }
        )
    for engine in engines.values():
        engine.close()
    env = environment(device)
    env["llama-cpp-python"] = metadata.version("llama-cpp-python")
    env["gguf"] = metadata.version("gguf")
    env["llama.cpp system info"] = llama_cpp.llama_print_system_info().decode().strip()
    gguf_info = {}
    for p, found in tensors.items():
        by_type: dict[str, int] = {}
        for kind, n in found.values():
            by_type[kind] = by_type.get(kind, 0) + n
        head = found.get("output.weight", found["token_embd.weight"])[0]
        gguf_info[p] = {
            "file_bytes": ggufs[p].stat().st_size,
            "bytes_by_type": by_type,
            "head_type": head + (" (tied token_embd)" if "output.weight" not in found else ""),
        }
    return {
        "benchmark": "llamacpp-anchor",
        "environment": env,
        "settings": {
            "model": args.model,
            "threads": args.threads,
            "batch": 1,
            "audio_seconds": args.seconds,
            "prompt_tokens": prompt_len,
            "max_new_tokens": args.max_new_tokens,
            "decode_steps_per_call": args.max_new_tokens - 1,
            "rounds": args.rounds,
            "warmup_rounds": 1,
            "cache_len_for_bytes": cache_len,
            "check_tokens": prompt_len,
            "check_steps": args.check_steps,
            "converter": str(llama_dir / "convert_hf_to_gguf.py"),
            "pairs": PAIRS,
            "llama.cpp": f"C API through llama-cpp-python; context defaults (flash attention "
            f"auto, f16 KV cache) but n_ctx {n_ctx}, n_batch = n_ubatch = {n_ctx}, "
            f"{args.threads} threads; prompt in one llama_decode, greedy argmax on the host",
            "gsopt": "each recipe's own prefill and decode stages (build_pipeline on the same "
            "model) through its KV cache's generate, fixed length, audio rows embedded once "
            "before timing; StageTimer per stage and per step",
            "prompt_ids": "gsopt: the transcription template with the clip's audio rows; "
            "llama.cpp: random token ids of the same length (the work does not depend on them)",
            "order": "interleaved: each round calls every engine once, llama.cpp then its gsopt "
            "pair, precision by precision",
            "bytes_per_token": "gsopt: decode_step_bytes; llama.cpp: the GGUF's tensors but an "
            "untied embedding table, one embedding row, K and V in f16; both at cache_len",
        },
        "read_ceiling_GBps": ceiling.best / 1e9,
        "logits_check": check,
        "gguf": gguf_info,
        "rows": rows,
        "pairs": pairs,
    }


def _list(text: str) -> list[str]:
    return [item for item in text.split(",") if item]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="cpu-real-width", help="variant name or checkpoint")
    parser.add_argument("--precisions", type=_list, default=list(PAIRS), metavar="LIST")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds after one warm-up")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=10.0, help="audio (sets the prompt)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--check-steps", type=int, default=8, help="decode steps checked")
    parser.add_argument(
        "--llama-cpp-source",
        type=Path,
        metavar="PATH",
        help="a llama.cpp tree or llama-cpp-python sdist (folder or .tar.gz) holding "
        "convert_hf_to_gguf.py; default: the installed version's sdist, fetched by pip",
    )
    parser.add_argument(
        "--work", type=Path, metavar="DIR", help="cache folder (default ~/.cache/gsopt/llamacpp)"
    )
    parser.add_argument("--out", type=Path, metavar="OUT", help="writes OUT.json/.md/.png")
    args = parser.parse_args()
    prog = Path(sys.argv[0]).name
    try:
        from gsopt.results import check_output, to_json, write_atomic

        if args.rounds < 1 or args.threads < 1 or args.max_new_tokens < 2:
            raise GsoptError("--rounds and --threads must be at least 1, --max-new-tokens 2")
        out = args.out or Path("bench/results") / f"llamacpp-{Path(args.model).name}"
        for suffix in (".json", ".md", ".png"):
            check_output(Path(f"{out}{suffix}"), folder=False)
        result = run(args)
    except GsoptError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    write_atomic(Path(f"{out}.json"), to_json(result))
    write_atomic(Path(f"{out}.md"), markdown(result))
    write_atomic(Path(f"{out}.png"), chart(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
