"""Greedy decoding, gpt-fast style: `prefill`, `decode_one_token`, `generate`.

Two KV-cache paths share one loop:
- `dynamic`: FMS as shipped. Left-padded prompts with a float mask and position ids, a
  cache that grows with `torch.cat`, the mask rebuilt every step (FMS's own helpers).
- `static`: gsopt's preallocated cache (`gsopt.kv_cache`). Right-padded prompts, each row
  at its own position; every decode step has the same shapes.
The loop syncs with the host only every `check_every` tokens, to stop at end-of-text.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from fms.modules.attention import get_attention_type
from fms.utils.generation import pad_input_ids

from gsopt.kv_cache import ATTN_NAME, StaticKVCache, bucket, decode_kwargs
from gsopt.timing import StageTimer, stage


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


def prefill_static(
    model,
    input_ids: torch.Tensor,
    lengths: torch.Tensor,
    audio_embeds: torch.Tensor | None,
    cache: list,
    decode_attention: str = "sdpa",
) -> torch.Tensor:
    """Run the prompt, fill the static cache; returns the first generated token [B, 1]."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    hidden, _ = model.decoder.base_model(
        model.embed(input_ids, audio_embeds),
        positions,
        cache,
        use_cache=True,
        attn_name=ATTN_NAME,
        cache_positions=positions,
        prefill=True,
        decode_attention=decode_attention,
    )
    last = hidden.gather(1, (lengths - 1)[:, None, None].expand(-1, 1, hidden.shape[-1]))
    return logits_from_hidden(model, last).argmax(-1)


def decode_one_token_static(
    model,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    cache: list,
    decode_attention: str = "sdpa",
) -> torch.Tensor:
    """One token per row at its own position; fixed shapes, no host sync."""
    hidden, _ = model.decoder.base_model(
        model.embed(tokens, None),
        positions[:, None],
        cache,
        use_cache=True,
        attn_name=ATTN_NAME,
        prefill=False,
        **decode_kwargs(positions, cache[0][0].shape[2], decode_attention),
    )
    return logits_from_hidden(model, hidden).argmax(-1)


def prefill_dynamic(
    model, prompts: list[torch.Tensor], audio_embeds: torch.Tensor | None, pad_id: int
):
    """FMS's stock path: left padding, float mask, growing cache."""
    ids, kwargs = pad_input_ids(prompts, pad_token_id=pad_id)
    device = model.decoder.head.weight.device
    ids, mask, positions = (
        ids.to(device),
        kwargs["mask"].to(device),
        kwargs["position_ids"].to(device),
    )
    hidden, cache = model.decoder.base_model(
        model.embed(ids, audio_embeds),
        positions,
        None,
        use_cache=True,
        attn_name="sdpa_causal",
        mask=mask,
    )
    return logits_from_hidden(model, hidden[:, -1:]).argmax(-1), cache, mask, positions[:, -1]


def decode_one_token_dynamic(model, tokens, positions, cache, mask):
    mask = get_attention_type(attn_name="sdpa_causal")["update_attn_kwargs"](mask=mask)["mask"]
    hidden, cache = model.decoder.base_model(
        model.embed(tokens, None),
        positions[:, None],
        cache,
        use_cache=True,
        attn_name="sdpa_causal",
        mask=mask,
    )
    return logits_from_hidden(model, hidden).argmax(-1), cache, mask


def _finished(generated: list[torch.Tensor], eos_id: int) -> bool:
    return bool((torch.cat(generated, 1) == eos_id).any(1).all())


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
    kv_cache: str = "static",
    eos_id: int | None = None,
    check_every: int = 8,
    prefill_bucket: int = 1,
    decode_attention: str = "sdpa",
    decode_step: Callable = decode_one_token_static,
    prefill: Callable = prefill_static,
    timer: StageTimer | None = None,
) -> torch.Tensor:
    """Greedy tokens [B, max_new_tokens] (rows past their end-of-text hold junk: use
    `truncate_at_eos`). `decode_step`/`prefill` replace the static-cache stages with compiled
    or captured versions of the same functions."""
    device = model.decoder.head.weight.device
    pad_id = model.config.decoder.pad_id if model.config.decoder.pad_id >= 0 else 0
    if kv_cache == "dynamic":
        with stage(timer, "prefill"):
            token, cache, mask, positions = prefill_dynamic(model, prompts, audio_embeds, pad_id)
    else:
        ids, lengths = right_pad(prompts, pad_id, prefill_bucket)
        ids, lengths = ids.to(device), lengths.to(device)
        cache = StaticKVCache.pooled(
            model, len(prompts), bucket(ids.shape[1] + max_new_tokens, 64)
        ).layers
        with stage(timer, "prefill"):
            token = prefill(model, ids, lengths, audio_embeds, cache, decode_attention)
        positions = lengths
    generated = [token]
    # Timing each step costs a device sync per token; a serving timer times the loop once.
    step_timer = timer if timer is not None and timer.per_step else None
    with stage(None if step_timer else timer, "decode"):
        for i in range(1, max_new_tokens):
            if eos_id is not None and i % check_every == 0 and _finished(generated, eos_id):
                break
            with stage(step_timer, "decode"):
                if kv_cache == "dynamic":
                    positions = positions + 1
                    token, cache, mask = decode_one_token_dynamic(
                        model, token, positions, cache, mask
                    )
                else:
                    token = decode_step(model, token, positions, cache, decode_attention)
                    positions = positions + 1
            # The one copy per step: a captured step (manual or reduce-overhead) returns a
            # buffer that its next replay overwrites.
            generated.append(token.clone())
    return torch.cat(generated, 1)
