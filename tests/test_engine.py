"""The static-cache decoder engine (gsopt.engine.generate, gsopt.engine.kv_cache) on the tiny
model: the defects a first GPU run would trip on, reproduced on the CPU, and the `verify`
step."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
import torch._dynamo.testing
import torch.nn.functional as F
from helpers import AUDIO_TOKEN_ID, allocations_of_at_least
from torch._inductor.utils import run_and_get_code
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

import gsopt
from gsopt.engine import attention, fms_decode
from gsopt.engine.generate import decode_one_token, generate, prefill, setup_cache, verify


@pytest.fixture(scope="module")
def model():
    return gsopt.load_model("tiny", seed=1, lora="merged")


def prompt(extra: int = 0) -> torch.Tensor:
    return torch.tensor(
        [5, 6, *[AUDIO_TOKEN_ID] * 9, 7, 8, 9, *(10 + i % 300 for i in range(extra))]
    )


def last(ids: torch.Tensor) -> torch.Tensor:
    """read_at for one row: the next token after its last prompt token."""
    return torch.tensor([[len(ids) - 1]])


@pytest.fixture(scope="module")
def audio(model):
    torch.manual_seed(0)
    return model.embed_audio(torch.randn(1, 40, 160))


model_device = torch.device("cpu")


def reference(model, prompts, audio, n):
    """FMS's stock path: the baseline every engine path must equal."""
    return fms_decode.generate(model, prompts, audio, n, stop_at_eos=False)


def test_static_engine_equals_fms_stock_path(model, audio):
    prompts = [prompt(), prompt(23)]
    both = torch.cat([audio, audio])
    expected = reference(model, prompts, both, 20)
    assert len(set(expected[0].tolist())) > 3
    assert torch.equal(generate(model, prompts, both, 20, stop_at_eos=False), expected)


def test_math_backend_prefill_and_decode(model, audio):
    """On CUDA in fp32 with GQA, SDPA falls back to its math backend, whose output FMS must
    be able to view: the prefill hands it a contiguous tensor."""
    expected = reference(model, [prompt()], audio, 12)
    with sdpa_kernel(SDPBackend.MATH):
        tokens = generate(model, [prompt()], audio, 12, stop_at_eos=False)
    assert torch.equal(tokens, expected)


def test_captured_outputs_are_copied_before_reuse(model, audio):
    """A captured step returns its graph's buffers and the next replay overwrites them
    (also under reduce-overhead, pytorch#175557). Model that contract exactly: each call
    first scribbles over the buffers it returned last time, then returns them again."""
    returned: list[torch.Tensor] = []

    def graph_like_step(*args):
        for buffer in returned:
            buffer.fill_(7)  # the next replay reuses the output memory
        outs = decode_one_token(*args)
        if not returned:
            returned.extend(out.clone() for out in outs)
        for buffer, out in zip(returned, outs, strict=True):
            buffer.copy_(out)
        return tuple(returned)

    expected = reference(model, [prompt()], audio, 16)
    tokens = generate(model, [prompt()], audio, 16, stop_at_eos=False, decode_step=graph_like_step)
    assert torch.equal(tokens, expected)


def test_compiled_decode_step_writes_the_cache_in_place(model, audio):
    """inductor turns `scatter_` into clone + scatter (a copy of the cache per layer per step);
    the indexed write stays in place. No buffer the size of a cache may appear."""
    torch._dynamo.reset()
    cache = setup_cache(model, 1, 64, max_seq_len=512)
    with torch.no_grad():
        token = prefill(model, prompt()[None], last(prompt()), audio, cache.layers).argmax(-1)
        positions = torch.tensor([len(prompt())])
        done = torch.zeros(1, dtype=torch.bool)
        step = torch.compile(decode_one_token, fullgraph=True)
        span = cache.span(len(prompt()) + 1, fixed=False)
        _, codes = run_and_get_code(step, model, token, positions, done, cache.layers, span)
    assert codes
    numel = cache.layers[0][0].numel()
    for code in codes:
        assert allocations_of_at_least(code, numel) == []
    # The check can see a copy: the same step with a scatter_ write allocates one.
    assert allocations_of_at_least(_scatter_code(cache.layers[0][0]), numel)


def _scatter_code(like: torch.Tensor) -> str:
    torch._dynamo.reset()
    cache = torch.zeros_like(like)
    torch._dynamo.mark_static_address(cache)

    def write(keys, positions, cache):
        index = positions[:, None, :, None].expand(-1, cache.shape[1], -1, cache.shape[3])
        cache.scatter_(2, index, keys)
        return cache.sum()

    keys = torch.randn(like.shape[0], like.shape[1], 1, like.shape[3])
    _, codes = run_and_get_code(torch.compile(write), keys, torch.tensor([[3]]), cache)
    return "\n".join(codes)


class SDPACalls(TorchFunctionMode):
    """Records every scaled_dot_product_attention call's query, key and flags."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.calls.append((args[0], args[1], kwargs))
        return func(*args, **kwargs)


def test_decode_attention_reads_kv_once_in_cache_dtype(audio):
    """A boolean mask with GQA sends CUDA's SDPA to math, which expands K/V per query head
    and upcasts them. The decode step must hand SDPA as many query heads as K/V heads (GQA
    folded into the query axis), no enable_gqa, and K/V in the cache's own dtype."""
    bf16 = gsopt.load_model("tiny", seed=1, lora="merged", dtype=torch.bfloat16)
    cache = setup_cache(bf16, 1, 64, max_seq_len=64)
    with torch.no_grad():
        token = prefill(bf16, prompt()[None], last(prompt()), audio.bfloat16(), cache.layers)
        token = token.argmax(-1)
        record = SDPACalls()
        with record:
            decode_one_token(
                bf16,
                token,
                torch.tensor([len(prompt())]),
                torch.zeros(1, dtype=torch.bool),
                cache.layers,
                cache.span(len(prompt()) + 1, fixed=False),
            )
    assert len(record.calls) == bf16.config.decoder.nlayers
    for query, key, kwargs in record.calls:
        assert query.shape[1] == key.shape[1]  # heads fold: plain multi-head attention
        assert not kwargs.get("enable_gqa", False)
        assert key.dtype == torch.bfloat16 and query.dtype == torch.bfloat16
        assert key.shape[2] == len(prompt()) + 1  # the valid span, not the whole cache


def test_decode_step_compiles_once_across_prompt_lengths(model, audio):
    """Prompt lengths 14 to 214 span four 64-token buckets; one cache, one decode graph."""
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    step = torch.compile(decode_one_token, backend=counter, fullgraph=True)
    caches = set()
    for extra in (0, 60, 130, 200):
        out = generate(model, [prompt(extra)], audio, 40, stop_at_eos=False, decode_step=step)
        assert torch.equal(out, reference(model, [prompt(extra)], audio, 40))
        caches.add(id(setup_cache(model, 1, 1)))
    assert counter.frame_count == 1
    assert len(caches) == 1


def test_cache_grows_by_doubling_only_when_needed(audio):
    model = gsopt.load_model("tiny", seed=1, lora="merged")  # no caches yet
    cache = setup_cache(model, 3, 100, max_seq_len=128)
    assert cache.capacity == 128 and setup_cache(model, 3, 128, 128) is cache
    grown = setup_cache(model, 3, 300, max_seq_len=128)
    assert grown.capacity == 512 and setup_cache(model, 3, 10, 128) is grown
    assert setup_cache(model, 2, 10, max_seq_len=128) is not grown  # one per batch size
    prompts = [prompt(), prompt(500)]  # needs more than the cache holds: it grows
    both = torch.cat([audio, audio])
    tokens = generate(model, prompts, both, 8, stop_at_eos=False, max_seq_len=64)
    assert torch.equal(tokens, reference(model, prompts, both, 8))
    assert setup_cache(model, 2, 1).capacity == 1024


def test_done_mask_is_updated_inside_the_step_and_stops_the_loop(model, audio):
    expected = reference(model, [prompt()], audio, 12)
    eos = int(expected[0, 5])  # pretend the 6th greedy token is end-of-text
    eos_model = gsopt.load_model("tiny", seed=1, lora="merged")
    eos_model.config = dataclasses.replace(eos_model.config, eos_token_id=eos)
    cache = setup_cache(eos_model, 1, 64)
    with torch.no_grad():
        token = prefill(eos_model, prompt()[None], last(prompt()), audio, cache.layers)
        token = token.argmax(-1)
        done = torch.zeros(1, dtype=torch.bool)
        span = cache.span(len(prompt()) + 1, fixed=False)
        token, done = decode_one_token(
            eos_model, token, torch.tensor([len(prompt())]), done, cache.layers, span
        )
    assert done.tolist() == [int(expected[0, 1]) == eos]
    tokens = generate(eos_model, [prompt()], audio, 12, check_every=1)
    first = expected[0].tolist().index(eos)
    assert tokens[0, : first + 1].tolist() == expected[0, : first + 1].tolist()
    assert tokens.shape[1] == first + 1  # stops at the first check after end-of-text


def greedy_accept(model, prompt_ids, audio, drafts: list[int], n: int, k: int) -> list[int]:
    """Speculative greedy decoding with given drafts, through `verify`: propose the next k
    draft tokens after each accepted run, accept the longest prefix that matches the model's
    own greedy tokens, then take the model's token at the first mismatch."""
    cache = setup_cache(model, 1, len(prompt_ids) + n + k)
    out = [int(prefill(model, prompt_ids[None], last(prompt_ids), audio, cache.layers).argmax())]
    position = len(prompt_ids)
    while len(out) < n:
        proposal = [out[-1], *drafts[len(out) : len(out) + k - 1]]
        proposal += [0] * (k - len(proposal))
        span = cache.span(position + k, fixed=False)
        greedy = verify(
            model, torch.tensor([proposal]), torch.tensor([position]), cache.layers, span
        )[0].tolist()
        accepted = 1
        while accepted < k and proposal[accepted] == greedy[accepted - 1]:
            accepted += 1
        out += greedy[:accepted]
        position += accepted
    return out[:n]


@pytest.mark.parametrize("accuracy", [1.0, 0.7, 0.0])
def test_verify_accepts_exactly_the_greedy_tokens(model, audio, accuracy):
    n, k = 24, 4
    expected = reference(model, [prompt()], audio, n)[0].tolist()
    generator = torch.Generator().manual_seed(int(accuracy * 10))
    drafts = [
        t
        if torch.rand((), generator=generator) < accuracy
        else int(torch.randint(320, (), generator=generator))
        for t in expected
    ]
    with torch.no_grad():
        assert greedy_accept(model, prompt(), audio, drafts, n, k) == expected


def test_verify_compiles_once_for_a_fixed_k(model, audio):
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    step = torch.compile(verify, backend=counter, fullgraph=True)
    cache = setup_cache(model, 2, 256)
    with torch.no_grad():
        for position in (20, 21, 90, 150):
            tokens = torch.randint(1, 300, (2, 4))
            positions = torch.tensor([position, position - 7])
            span = cache.span(position + 4, fixed=False)
            got = step(model, tokens, positions, cache.layers, span)
            assert torch.equal(got, verify(model, tokens, positions, cache.layers, span))
    assert counter.frame_count == 1


def test_every_decode_attention_in_the_registry_gives_the_stock_tokens(model, audio):
    """Each registered decode kernel that runs here (the Triton one under the interpreter)
    is an FMS attention op the engine can call by name, and decodes the stock path's
    tokens."""
    from fms.modules.attention import get_attention_type

    runs = {n: a for n, a in attention.REGISTRY["decode"].items() if a.runs_on(model_device)}
    assert {"sdpa", "triton"} <= set(runs)
    prompts = [prompt(), prompt(7)]
    both = torch.cat([audio, audio])
    expected = reference(model, prompts, both, 12)
    for name, impl in runs.items():
        op = impl.load()
        assert get_attention_type(attn_name=op)["compute_decode"] is not None, name
        step = functools.partial(decode_one_token, attn_name=op)
        fill = functools.partial(prefill, attn_name=op)
        tokens = generate(
            model, prompts, both, 12, stop_at_eos=False, prefill_step=fill, decode_step=step
        )
        assert torch.equal(tokens, expected), name
