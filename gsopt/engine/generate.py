"""Greedy decoding on the static KV cache, gpt-fast style: `setup_cache`, `prefill`,
`decode_one_token`, `decode_n_tokens`, `step_logits` and `verify`, `generate`. Beam search on
the same cache is `gsopt.engine.beam`.

Each step is a small function of tensors that a recipe compiles or captures as it is:
- rows are right-padded and each keeps its own position, so a batched row is computed as the
  same prompt alone;
- the decode step has fixed shapes but for the attended span (`StaticKVCache.span`), a
  dynamic size, so it compiles to one graph for every prompt length; captured steps attend
  over the whole cache instead (`fixed_span`);
- end-of-text is a device-side `done` mask updated inside the step; the loop reads it only
  every `check_every` tokens.
FMS's stock path (growing cache, the baseline) is `gsopt.engine.fms_decode`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from gsopt.engine.kv_cache import SDPA, StaticKVCache, bucket, cache_for, cache_mask
from gsopt.engine.timing import StageTimer, stage


def logits_from_hidden(model, hidden: torch.Tensor) -> torch.Tensor:
    """Granite's head: logits are divided by logits_scaling (transformers 5.x forgets this)."""
    return model.decoder.head(hidden) / model.config.decoder.logits_scaling


def right_pad(prompts: list[torch.Tensor], pad_id: int, multiple: int = 1):
    """Right-padded ids [B, L] (L bucketed) and each row's length."""
    lengths = torch.tensor([len(p) for p in prompts])
    width = bucket(int(lengths.max()), multiple)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = prompt
    return ids, lengths


def default_max_seq_len(model) -> int:
    """Cache positions a static cache starts with (`GraniteSpeechConfig.cache_positions`);
    a request that needs more doubles it (`cache_for`)."""
    return model.config.cache_positions


def setup_cache(model, batch: int, needed: int, max_seq_len: int | None = None) -> StaticKVCache:
    return cache_for(model, batch, needed, max_seq_len or default_max_seq_len(model))


def _forward(model, embeds, positions, cache: list, attn_name: str, **attn_kwargs):
    hidden, _ = model.decoder.base_model(
        embeds, positions, cache, use_cache=True, attn_name=attn_name, **attn_kwargs
    )
    return hidden


def prefill(
    model,
    input_ids: torch.Tensor,
    read_at: torch.Tensor,
    audio_embeds: torch.Tensor | None,
    cache: list,
    text_from: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    attn_name: str = SDPA,
) -> torch.Tensor:
    """Run the prompt [B, L], fill the static cache; returns the next-token logits after
    each position in read_at [B, n] ([B, 1] at each row's last prompt token for plain
    decoding; the prompt's end and every draft token for speculation). `text_from` [B]:
    where each row's prompt ends, when a draft follows it (`GraniteSpeech.embed`). `rows`
    [B]: the cache rows to fill (default the first B; a continuous batch's free slots)."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    hidden = _forward(
        model,
        model.embed(input_ids, audio_embeds, text_from),
        positions,
        cache,
        attn_name,
        cache_positions=positions,
        prefill=True,
        **({} if rows is None else {"cache_rows": rows}),
    )
    picked = hidden.gather(1, read_at[:, :, None].expand(-1, -1, hidden.shape[-1]))
    return logits_from_hidden(model, picked)


def step_logits(
    model,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    cache: list,
    kv_index: torch.Tensor,
    attn_name: str = SDPA,
) -> torch.Tensor:
    """k tokens per row [B, k], row b's first at positions[b], in one forward: attention is
    causal within the block and sees the row's cache before it. Returns the logits after each
    of the k positions [B, k, vocab]. Slots written past what a caller accepts are harmless:
    a later step writes its own position before anything reads it."""
    k = tokens.shape[1]
    cache_positions = positions[:, None] + torch.arange(k, device=tokens.device)
    attn = model.decoder.base_model.layers[0].attn  # its heads are this rank's under TP
    group = attn.nheads // attn.kvheads
    hidden = _forward(
        model,
        model.embed(tokens, None),
        cache_positions,
        cache,
        attn_name,
        cache_positions=cache_positions,
        cache_mask=cache_mask(cache_positions, kv_index, group),
    )
    return logits_from_hidden(model, hidden)


def verify(
    model,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    cache: list,
    kv_index: torch.Tensor,
    attn_name: str = SDPA,
) -> torch.Tensor:
    """`step_logits`' greedy token after each of the k positions [B, k]."""
    return step_logits(model, tokens, positions, cache, kv_index, attn_name).argmax(-1)


def decode_one_token(
    model,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    done: torch.Tensor,
    cache: list,
    kv_index: torch.Tensor,
    attn_name: str = SDPA,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row at its own position, and the rows done so far; no host sync."""
    token = verify(model, tokens, positions, cache, kv_index, attn_name)
    return token, done | (token[:, 0] == model.config.eos_token_id)


def _guards_checked_once(step: int):
    """A compiled step's guards are checked on a loop's first step only. The later steps
    pass the same model and cache objects with the same shapes (the span is a dynamic
    size), so their guards cannot fail; checking them (about 900, Python lambdas for each
    quantized weight) cost 0.4-0.7 ms of a 9 ms int8 step on a 2-core CPU. Dynamo still
    tells cached graphs apart (`skip_guard_eval_unsafe` keeps differentiating guards)."""
    if step == 0:
        return contextlib.nullcontext()
    return torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)


def decode_n_tokens(
    model,
    token: torch.Tensor,
    positions: torch.Tensor,
    cache: StaticKVCache,
    n: int,
    *,
    longest: int,
    decode_step: Callable = decode_one_token,
    fixed_span: bool = False,
    stop_at_eos: bool = True,
    check_every: int = 8,
    timer: StageTimer | None = None,
) -> list[torch.Tensor]:
    """Up to n more tokens after `token`, the first at `positions` (`longest` is their
    maximum, known on the host: it sizes the attended span). Stops early once every row is
    done, checked every `check_every` steps: the loop's only host syncs."""
    done = token[:, 0] == model.config.eos_token_id
    generated = []
    for i in range(n):
        if stop_at_eos and i % check_every == 0 and bool(done.all()):
            break
        with stage(timer, "decode"), _guards_checked_once(i):
            span = cache.span(longest + i + 1, fixed_span)
            # A captured step returns its graph's own buffers, which its next replay
            # overwrites (also for reduce-overhead, pytorch#175557): copy before feeding
            # them back, and keep that one copy.
            token, done = (
                out.clone()
                for out in decode_step(model, token, positions, done, cache.layers, span)
            )
        positions = positions + 1
        generated.append(token)
    return generated


def truncate_at_eos(tokens: torch.Tensor, eos_id: int) -> list[list[int]]:
    """Each row's tokens up to and including its first end-of-text."""
    rows = []
    for row in tokens.tolist():
        rows.append(row[: row.index(eos_id) + 1] if eos_id in row else row)
    return rows


@torch.no_grad()
def generate(
    model,
    prompts: list[torch.Tensor],
    audio_embeds: torch.Tensor | None,
    max_new_tokens: int,
    *,
    stop_at_eos: bool = True,
    check_every: int = 8,
    prefill_bucket: int = 1,
    max_seq_len: int | None = None,
    prefill_step: Callable = prefill,
    decode_step: Callable = decode_one_token,
    fixed_span: bool = False,
    timer: StageTimer | None = None,
) -> torch.Tensor:
    """Greedy tokens [B, <= max_new_tokens] (rows past their end-of-text hold junk: use
    `truncate_at_eos`). `prefill_step`/`decode_step` are these functions or compiled or
    captured versions of them; `fixed_span` says the decode step needs fixed shapes."""
    device = model.decoder.head.weight.device
    pad_id = max(model.config.decoder.pad_id, 0)
    ids, lengths = right_pad(prompts, pad_id, prefill_bucket)
    longest = int(lengths.max())
    ids, lengths = ids.to(device), lengths.to(device)
    cache = setup_cache(model, len(prompts), ids.shape[1] + max_new_tokens, max_seq_len)
    with stage(timer, "prefill"):
        read_at = (lengths - 1)[:, None]
        token = prefill_step(model, ids, read_at, audio_embeds, cache.layers).argmax(-1)
    # Timing each step costs a device sync per token; a serving timer times the loop once.
    step_timer = timer if timer is not None and timer.per_step else None
    with stage(None if step_timer else timer, "decode"):
        generated = decode_n_tokens(
            model,
            token,
            lengths,
            cache,
            max_new_tokens - 1,
            longest=longest,
            decode_step=decode_step,
            fixed_span=fixed_span,
            stop_at_eos=stop_at_eos,
            check_every=check_every,
            timer=step_timer,
        )
    return torch.cat([token, *generated], 1)
