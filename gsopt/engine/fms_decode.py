"""FMS's stock decoding path, the baseline every recipe is checked and timed against.

Left-padded prompts with a float mask and position ids, a cache that grows with `torch.cat`
and the mask rebuilt every step, through FMS's own helpers: every step has new shapes, so
nothing here is compiled or captured. gsopt's engine is `gsopt.engine.generate`.
"""

from __future__ import annotations

import torch
from fms.modules.attention import get_attention_type
from fms.utils.generation import pad_input_ids

from gsopt.engine.generate import logits_from_hidden
from gsopt.engine.timing import StageTimer, stage

ATTN_NAME = "sdpa_causal"


def prefill(model, prompts: list[torch.Tensor], audio_embeds: torch.Tensor | None):
    pad_id = max(model.config.decoder.pad_id, 0)
    ids, kwargs = pad_input_ids(prompts, pad_token_id=pad_id)
    device = model.decoder.head.weight.device
    mask, positions = kwargs["mask"].to(device), kwargs["position_ids"].to(device)
    hidden, cache = model.decoder.base_model(
        model.embed(ids.to(device), audio_embeds),
        positions,
        None,
        use_cache=True,
        attn_name=ATTN_NAME,
        mask=mask,
    )
    return logits_from_hidden(model, hidden[:, -1:]).argmax(-1), cache, mask, positions[:, -1]


def decode_one_token(model, tokens, positions, cache, mask):
    mask = get_attention_type(attn_name=ATTN_NAME)["update_attn_kwargs"](mask=mask)["mask"]
    hidden, cache = model.decoder.base_model(
        model.embed(tokens, None),
        positions[:, None],
        cache,
        use_cache=True,
        attn_name=ATTN_NAME,
        mask=mask,
    )
    return logits_from_hidden(model, hidden).argmax(-1), cache, mask


@torch.no_grad()
def generate(
    model,
    prompts: list[torch.Tensor],
    audio_embeds: torch.Tensor | None,
    max_new_tokens: int,
    *,
    stop_at_eos: bool = True,
    check_every: int = 8,
    timer: StageTimer | None = None,
) -> torch.Tensor:
    """Greedy tokens [B, <= max_new_tokens], as `gsopt.engine.generate.generate` returns them."""
    eos_id = model.config.eos_token_id
    with stage(timer, "prefill"):
        token, cache, mask, positions = prefill(model, prompts, audio_embeds)
    done = token[:, 0] == eos_id
    generated = [token]
    step_timer = timer if timer is not None and timer.per_step else None
    with stage(None if step_timer else timer, "decode"):
        for i in range(max_new_tokens - 1):
            if stop_at_eos and i % check_every == 0 and bool(done.all()):
                break
            with stage(step_timer, "decode"):
                positions = positions + 1
                token, cache, mask = decode_one_token(model, token, positions, cache, mask)
                done = done | (token[:, 0] == eos_id)
            generated.append(token)
    return torch.cat(generated, 1)
