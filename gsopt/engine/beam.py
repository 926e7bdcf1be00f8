"""Beam search on the static KV cache, token for token transformers' `generate(num_beams=K)`.

transformers' beam search (5.x `_beam_search`, with generate's defaults: length_penalty 1.0,
early_stopping False, one returned sequence) kept as tensors on the device, so a step needs
no host sync:
- each step takes the top 2K continuations of the K running beams (summed log-probabilities);
  those ending in end-of-text (or at the length limit) compete, their score divided by their
  length, for the K finished slots; the best K others run on;
- a batch item stops improving once its best running beam, at its current length, cannot
  beat its worst finished one (transformers' heuristic for early_stopping False); the search
  ends when no item can improve or at max_new_tokens.
The K beams of row b are cache rows b*K .. b*K + K - 1. The prompt is prefilled once per row
(not once per beam) and copied to its beams; after each step every cache row takes its
parent beam's keys and values in place (`reorder_cache`: a gather written back by index into
the same buffers), over the positions where beams can differ only. One step (decoder forward,
selection, reorder) is one function of tensors (`beam_step`): a recipe compiles it as it
compiles the decode step, one graph per batch and beam count. Logits are Granite's (divided
by logits_scaling), which transformers 5.x forgets for Granite Speech: compare beams against
it with the scaling folded into its head.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from gsopt.engine import generate as engine
from gsopt.engine.kv_cache import SDPA
from gsopt.engine.timing import StageTimer, stage

# transformers' score of a finished hypothesis: log-probability sum / length ** this.
LENGTH_PENALTY = 1.0
# Its mask for candidates that may not run on or may not finish.
MASKED = -1.0e9


class BeamState(NamedTuple):
    """The search's tensors, updated in place by every step: B items, K beams, T tokens."""

    running: torch.Tensor  # [B, K, T] tokens of the running beams
    running_scores: torch.Tensor  # [B, K] their summed log-probabilities
    finished: torch.Tensor  # [B, K, T] the best finished hypotheses, best first
    finished_scores: torch.Tensor  # [B, K] their length-normalised scores
    is_finished: torch.Tensor  # [B, K] which finished slots hold one
    improvable: torch.Tensor  # [B, 1] whether a running beam may still beat a finished one
    step: torch.Tensor  # [] the index of the token being chosen
    eos_bias: torch.Tensor  # [vocab] -inf at end-of-text while it is suppressed, else 0

    @classmethod
    def new(cls, batch: int, beams: int, tokens: int, vocab: int, eos: int, device, allow_eos):
        fill = torch.full((batch, beams, tokens), eos, dtype=torch.long, device=device)
        scores = torch.zeros(batch, beams, device=device)
        scores[:, 1:] = MASKED  # the first step draws from one beam (all hold the prompt)
        eos_bias = torch.zeros(vocab, device=device)
        if not allow_eos:
            eos_bias[eos] = -torch.inf
        return cls(
            running=fill,
            running_scores=scores,
            finished=fill.clone(),
            finished_scores=torch.full((batch, beams), MASKED, device=device),
            is_finished=torch.zeros(batch, beams, dtype=torch.bool, device=device),
            improvable=torch.ones(batch, 1, dtype=torch.bool, device=device),
            step=torch.zeros((), dtype=torch.long, device=device),
            eos_bias=eos_bias,
        )


def _take(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tensor[b, index[b, j], ...] for each b, j."""
    while index.dim() < tensor.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(tensor, index, dim=1)


def select(log_probs: torch.Tensor, state: BeamState, eos: int) -> torch.Tensor:
    """One step of transformers' selection from the log-probabilities of every running beam
    [B * K, vocab]: the state updated in place; returns each new beam's parent cache row
    [B * K]."""
    batch, beams, tokens = state.running.shape
    vocab = log_probs.shape[-1]
    t = state.step
    log_probs = log_probs + state.eos_bias
    scores = (log_probs.view(batch, beams, vocab) + state.running_scores[:, :, None]).view(
        batch, beams * vocab
    )
    top_scores, top_index = torch.topk(scores, 2 * beams)
    parent, token = top_index // vocab, top_index % vocab
    candidates = _take(state.running, parent)
    now = torch.arange(tokens, device=t.device) == t
    candidates = torch.where(now, token[:, :, None], candidates)
    hits = (token == eos) | (t + 1 >= tokens)
    # The best K that did not stop run on.
    alive = top_scores + hits.to(torch.float32) * MASKED
    keep = torch.topk(alive, beams).indices
    state.running.copy_(_take(candidates, keep))
    state.running_scores.copy_(_take(alive, keep))
    offsets = torch.arange(batch, device=t.device)[:, None] * beams
    parents = (_take(parent, keep) + offsets).flatten()
    # The top K that stopped compete with the finished ones.
    just_finished = hits.clone()
    just_finished[:, beams:] = False
    done = top_scores / ((t + 1) ** LENGTH_PENALTY)
    done = done + (~state.improvable).to(torch.float32) * MASKED
    done = done + (~just_finished).to(torch.float32) * MASKED
    merged_scores = torch.cat((state.finished_scores, done), dim=1)
    best = torch.topk(merged_scores, beams).indices
    state.finished.copy_(_take(torch.cat((state.finished, candidates), dim=1), best))
    state.finished_scores.copy_(_take(merged_scores, best))
    state.is_finished.copy_(_take(torch.cat((state.is_finished, just_finished), dim=1), best))
    # Can the best running beam, at its length now, still beat the worst finished one?
    best_running = state.running_scores[:, :1] / ((t + 1) ** LENGTH_PENALTY)
    worst = state.finished_scores.min(dim=1, keepdim=True).values
    worst_finished = torch.where(state.is_finished, worst, MASKED)
    state.improvable.copy_(
        state.improvable & (best_running > worst_finished).any(dim=-1, keepdim=True)
    )
    state.step.add_(1)
    return parents


def reorder_cache(layers: list, parents: torch.Tensor, window: torch.Tensor) -> None:
    """Every cache row takes row parents[r]'s keys and values at the positions `window`,
    written back in place into the same buffers (an indexed write, as the steps store keys;
    the gathered rows are the only scratch)."""
    rows = torch.arange(parents.shape[0], device=parents.device)[:, None]
    source, positions = parents[:, None], window[None, :]
    for keys, values in layers:
        for buffer in (keys, values):
            buffer[rows, :, positions] = buffer[source, :, positions]


def beam_step(
    model,
    state: BeamState,
    positions: torch.Tensor,
    cache: list,
    kv_index: torch.Tensor,
    window: torch.Tensor,
    attn_name: str = SDPA,
) -> None:
    """One step for every beam: the decoder reads each beam's last token (at `positions`,
    [B * K], advanced in place), the search selects, the cache follows the parents."""
    batch, beams, _ = state.running.shape
    last = state.running.index_select(2, (state.step - 1).view(1)).view(batch * beams, 1)
    logits = engine.step_logits(model, last, positions, cache, kv_index, attn_name)[:, 0]
    parents = select(logits.float().log_softmax(-1), state, model.config.eos_token_id)
    reorder_cache(cache, parents, window)
    positions.add_(1)


@torch.no_grad()
def beam_search(
    model,
    prompts: list[torch.Tensor],
    audio_embeds: torch.Tensor | None,
    max_new_tokens: int,
    num_beams: int,
    *,
    stop_at_eos: bool = True,
    check_every: int = 8,
    prefill_bucket: int = 1,
    max_seq_len: int | None = None,
    prefill_step: Callable = engine.prefill,
    step: Callable = beam_step,
    on_forward: Callable[[int], None] | None = None,
    timer: StageTimer | None = None,
) -> torch.Tensor:
    """Each row's best hypothesis [B, max_new_tokens] (end-of-text, then end-of-text to the
    end); `stop_at_eos=False` suppresses end-of-text, as transformers' min_new_tokens does,
    so every call runs max_new_tokens steps (benchmarks). `step` is `beam_step` or a compiled
    version of it; `on_forward(rows)` hears of each decoder forward and the rows it computed.
    The loop reads the device only every `check_every` steps, to stop once nothing can
    improve."""
    device, eos = model.decoder.head.weight.device, model.config.eos_token_id
    batch, beams = len(prompts), num_beams
    ids, lengths = engine.right_pad(prompts, max(model.config.decoder.pad_id, 0), prefill_bucket)
    longest, shortest = int(lengths.max()), int(lengths.min())
    cache = engine.setup_cache(model, batch * beams, ids.shape[1] + max_new_tokens, max_seq_len)
    with stage(timer, "prefill"):
        read_at = (lengths - 1)[:, None].to(device)
        logits = prefill_step(model, ids.to(device), read_at, audio_embeds, cache.layers)[:, 0]
        state = BeamState.new(
            batch, beams, max_new_tokens, logits.shape[-1], eos, device, stop_at_eos
        )
        log_probs = logits.float().log_softmax(-1).repeat_interleave(beams, 0)
        # The prefill filled rows 0 .. B-1: row b's beams take its prompt.
        parents = select(log_probs, state, eos) // beams
        reorder_cache(cache.layers, parents, cache.kv_index[:longest])
    if on_forward is not None:
        on_forward(batch)
    positions = lengths.repeat_interleave(beams).to(device)
    step_timer = timer if timer is not None and timer.per_step else None
    with stage(None if step_timer else timer, "decode"):
        for i in range(1, max_new_tokens):
            if i % check_every == 0 and not bool(state.improvable.any()):
                break
            with stage(step_timer, "decode"), engine._guards_checked_once(i - 1):
                span = cache.span(longest + i, False)
                # From the last prompt position on (beams share it; a window of one
                # position would be a size-1 dimension, specialised by the compiler).
                window = cache.kv_index[shortest - 1 : longest + i]
                torch._dynamo.maybe_mark_dynamic(window, 0)
                step(model, state, positions, cache.layers, span, window)
            if on_forward is not None:
                on_forward(batch * beams)
    return state.finished[:, 0]
