"""Speculative greedy decoding: the decoder verifies proposed tokens, many per forward.

The decoder is nearly all of Granite Speech's time and at batch 1 a forward costs about the
same for one token or several, so the fewer forwards, the faster. Proposals come from a
draft (the encoder's own CTC transcript, `gsopt.engine.drafts`, or an oracle for benchmarks) or
from a smaller draft model.

- `exact` (lossless): with a draft, the prompt and the whole draft go through one forward
  (prefill and verification in one pass); the longest prefix on which the model's greedy
  argmax equals the draft is accepted, and the model's own token is taken at the first
  mismatch. Then the rest of the draft is used prompt-lookup style: the last generated
  tokens are looked up in it, the tokens that follow are checked with `verify`, and a plain
  decode step runs when nothing matches. A draft model proposes k - 1 tokens a round
  instead. Either way the output is token for token plain greedy decoding's.
- `relaxed` (IBM's criterion, lossy): a non-empty draft whose CTC confidence (its largest
  per-frame entropy) is at most `ctc_threshold` is taken as it is, and its row leaves the
  batch before any decoder work; the other rows, in a batch compacted by index, go through
  the prompt-and-draft forward, where a draft is taken when each of its tokens has
  probability at least `confidence_threshold`; otherwise the row goes on exactly, or is
  decoded afresh by beam search (`gsopt.engine.beam`, IBM's fallback).
Every row keeps its own accepted length and position. Draft positions are always text, a
token equal to the audio id included (the prefill's `text_from`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from gsopt.engine import beam as beams
from gsopt.engine import generate as engine
from gsopt.engine.drafts import DRAFT_KINDS, DraftKind
from gsopt.engine.timing import StageTimer, stage

MODES = ("exact", "relaxed")


@dataclass(frozen=True)
class Speculation:
    """A recipe's `[speculate]` table. `draft`: a kind in `gsopt.engine.drafts.DRAFT_KINDS`
    (`ctc`: the grapheme CTC head, any checkpoint; `ctc-bpe`: granite-speech-4.1's BPE
    head; `model`: a draft model, from `draft_model` or a command's --draft-model); `k`:
    tokens per verification step; `mode`: `exact` (lossless) or `relaxed` (IBM's criterion,
    lossy), which takes a draft whose CTC confidence is at most `ctc_threshold`, or one whose
    every token has probability at least `confidence_threshold`. Unset thresholds are the
    ones IBM published for the draft's head (`DraftKind.thresholds`)."""

    draft: str = "ctc"
    k: int = 8
    mode: str = "exact"
    ctc_threshold: float | None = None
    confidence_threshold: float | None = None
    draft_model: str = ""

    def __post_init__(self):
        kind = DRAFT_KINDS.get(self.draft)
        if kind is None or kind.thresholds is None:
            return
        ctc, confidence = kind.thresholds
        if self.ctc_threshold is None:
            object.__setattr__(self, "ctc_threshold", ctc)
        if self.confidence_threshold is None:
            object.__setattr__(self, "confidence_threshold", confidence)

    @property
    def kind(self) -> DraftKind:
        return DRAFT_KINDS[self.draft]


# Longest run of generated tokens looked up in the draft (prompt-lookup decoding's n-gram).
MAX_NGRAM = 3


@dataclass
class RowDecision:
    """What speculation did for one row of a call: `decision` is `exact` (exact mode), or the
    relaxed mode's `accepted` (the CTC draft as it is, no decoder work), `verified` (the draft
    after one verifying forward) or `fallback` (decoded instead); `drafted` the row's draft
    tokens; `accepted` those in its answer (all of a taken draft, else the ones the decoder
    agreed with); `forwards` the decoder forwards the row needed."""

    decision: str
    drafted: int = 0
    accepted: int = 0
    forwards: int = 0


@dataclass
class SpeculationStats:
    """What speculation did, summed over the calls it served, and each row of the last."""

    drafted: int = 0  # tokens proposed to the decoder
    accepted: int = 0  # of those, tokens the decoder agreed with
    forwards: int = 0  # decoder forwards (the prompt's included), each over the batch it ran
    row_forwards: int = 0  # forwards times the rows each computed
    tokens: int = 0  # tokens generated (up to and including each row's end-of-text)
    relaxed_accepted: int = 0  # rows taken from the CTC draft without the decoder
    relaxed_verified: int = 0  # rows whose draft passed the verifying forward
    relaxed_fallback: int = 0  # rows decoded on the exact path instead
    rows: list[RowDecision] = field(default_factory=list)  # the last call's, in batch order

    def count_forward(self, rows: int) -> None:
        self.forwards += 1
        self.row_forwards += rows

    def to_json(self) -> dict:
        """With tokens per forward of one row: 1 for plain decoding."""
        per_forward = self.tokens / self.row_forwards if self.row_forwards else None
        return {**asdict(self), "tokens_per_forward": per_forward}


@dataclass(frozen=True)
class Steps:
    """The decoder steps speculation calls: `gsopt.engine.generate`'s functions and the beam
    search step (the relaxed mode's fallback), or compiled or captured versions of them."""

    prefill: Callable = engine.prefill
    decode: Callable = engine.decode_one_token
    verify: Callable = engine.verify
    fixed_span: bool = False
    beam: Callable = beams.beam_step


def accepted_prefix(greedy: list[int], proposal: list[int]) -> int:
    """How many leading proposed tokens equal the model's greedy tokens at their places."""
    count = 0
    while count < len(proposal) and greedy[count] == proposal[count]:
        count += 1
    return count


def lookup(history: list[int], draft: list[int], start: int, width: int) -> tuple[int, list[int]]:
    """Prompt-lookup decoding over a draft: the longest tail of `history` (up to MAX_NGRAM
    tokens) found in draft[start - n:], nearest `start` first. Returns where the proposal
    starts in the draft and the up to `width` tokens that follow the match."""
    for n in range(min(MAX_NGRAM, len(history)), 0, -1):
        tail = history[-n:]
        for i in range(max(0, start - n), len(draft) - n):
            if draft[i : i + n] == tail:
                return i + n, draft[i + n : i + n + width]
    return start, []


class DraftLookup:
    """Proposals from each row's draft, prompt-lookup style."""

    def __init__(self, drafts: list[list[int]], cursors: list[int]):
        self.drafts = drafts
        self.cursors = cursors  # where each row's unused draft begins

    def propose(self, outputs, positions, rows: list[int], width: int) -> dict[int, list[int]]:
        proposals = {}
        for r in rows:
            self.cursors[r], proposals[r] = lookup(
                outputs[r], self.drafts[r], self.cursors[r], width
            )
        return proposals

    def accepted(self, row: int, proposal: list[int], count: int) -> None:
        self.cursors[row] += count


class DraftModel:
    """Proposals from a smaller model with the same tokenizer, gpt-fast style: each round it
    first reads the tokens it has not seen (the target's correction, and the last proposal
    when all were accepted) in one 2-wide `verify`, then decodes the rest one by one, all on
    its own static cache at its own positions."""

    def __init__(self, model, steps: Steps, prompts, audio_embeds, target_prompt_lengths, room):
        """Prefill the draft's own prompts; `room`: positions the target may still use."""
        self.model, self.steps = model, steps
        device = model.decoder.head.weight.device
        ids, lengths = engine.right_pad(prompts, max(model.config.decoder.pad_id, 0))
        self.cache = engine.setup_cache(model, len(prompts), ids.shape[1] + room)
        steps.prefill(
            model,
            ids.to(device),
            (lengths - 1)[:, None].to(device),
            audio_embeds,
            self.cache.layers,
        )
        # The draft's position of a token = the target's + this (prompts may differ in length).
        self.offset = [int(d) - int(t) for d, t in zip(lengths, target_prompt_lengths, strict=True)]
        self.unseen: list[list[int]] = [[] for _ in prompts]

    def propose(self, outputs, positions, rows: list[int], width: int) -> dict[int, list[int]]:
        model, device = self.model, self.model.decoder.head.weight.device
        batch = len(outputs)
        pending = [self.unseen[r] + [outputs[r][-1]] for r in range(batch)]
        starts = [positions[r] + self.offset[r] - len(pending[r]) + 1 for r in range(batch)]
        block = torch.tensor([p + [p[-1]] * (2 - len(p)) for p in pending])
        where = torch.tensor(starts)
        span = self.cache.span(max(starts) + 2, self.steps.fixed_span)
        greedy = self.steps.verify(
            model, block.to(device), where.to(device), self.cache.layers, span
        )
        read = torch.tensor([len(p) - 1 for p in pending], device=device)
        token = greedy.gather(1, read[:, None])
        proposed = [token]
        position = where.to(device) + read + 1
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        for step in range(width - 1):
            span = self.cache.span(max(starts) + 3 + step, self.steps.fixed_span)
            token, _ = self.steps.decode(model, token, position, done, self.cache.layers, span)
            token = token.clone()
            proposed.append(token)
            position = position + 1
        tokens = torch.cat(proposed, 1).tolist()
        return {r: tokens[r] for r in rows}

    def accepted(self, row: int, proposal: list[int], count: int) -> None:
        # The draft never read its own last proposal: when it was accepted, read it next.
        self.unseen[row] = [proposal[-1]] if proposal and count == len(proposal) else []


@torch.no_grad()
def speculative_generate(
    model,
    prompts: list[torch.Tensor],
    audio_embeds: torch.Tensor | None,
    max_new_tokens: int,
    *,
    drafts: list[list[int]] | None = None,
    draft_model: tuple | None = None,
    k: int = 8,
    mode: str = "exact",
    confidences: list[float] | None = None,
    ctc_threshold: float = 0.5,
    confidence_threshold: float = 0.01,
    steps: Steps = Steps(),
    fallback_beams: int = 1,
    stop_at_eos: bool = True,
    prefill_bucket: int = 1,
    max_seq_len: int | None = None,
    stats: SpeculationStats | None = None,
    timer: StageTimer | None = None,
) -> torch.Tensor:
    """Greedy tokens [B, max_new_tokens] as `gsopt.engine.generate.generate` gives them (rows past
    their end-of-text hold end-of-text), from fewer decoder forwards. Give `drafts` (a token
    list per row; empty: none) or `draft_model` = (model, steps, prompts, audio_embeds);
    `confidences` are the CTC drafts' per row, for the relaxed mode, whose rows that fall
    back are decoded by beam search from the prompt when `fallback_beams` > 1 (as IBM's
    leaderboard runs do: `generate(num_beams=2)`); otherwise they go on exactly."""
    stats = stats if stats is not None else SpeculationStats()
    eos, device = model.config.eos_token_id, model.decoder.head.weight.device
    batch = len(prompts)
    drafts = [list(d[: max_new_tokens - 1]) for d in drafts] if drafts else [[]] * batch
    confidences = confidences or [math.inf] * batch
    outputs: list[list[int]] = [[] for _ in range(batch)]
    records = [RowDecision("exact", len(d)) for d in drafts]
    # Rows whose CTC draft is confident leave the batch before any decoder work (a draft model
    # drafts nothing up front, so with one no row is confident).
    rest = []
    for row, draft in enumerate(drafts):
        if mode == "relaxed" and ctc_confident(draft, confidences[row], ctc_threshold):
            outputs[row] = [*draft, eos]
            records[row] = RowDecision("accepted", len(draft), len(draft))
            stats.relaxed_accepted += 1
        else:
            rest.append(row)
    if rest:
        if len(rest) < batch:
            index = torch.tensor(rest, device=device)
            prompts = [prompts[r] for r in rest]
            audio_embeds = audio_embeds.index_select(0, index) if audio_embeds is not None else None
        decoded, decided = _speculate(
            model,
            prompts,
            audio_embeds,
            max_new_tokens,
            [drafts[r] for r in rest],
            [confidences[r] for r in rest],
            draft_model,
            k,
            mode,
            ctc_threshold,
            confidence_threshold,
            steps,
            fallback_beams,
            stop_at_eos,
            prefill_bucket,
            max_seq_len,
            stats,
            timer,
        )
        for row, out, record in zip(rest, decoded, decided, strict=True):
            outputs[row], records[row] = out, record
    stats.rows = records
    rows = [(out + [eos] * max_new_tokens)[:max_new_tokens] for out in outputs]
    stats.tokens += sum(len(engine.truncate_at_eos(torch.tensor([r]), eos)[0]) for r in rows)
    return torch.tensor(rows, device=device)


def _speculate(
    model,
    prompts,
    audio_embeds,
    max_new_tokens,
    drafts,
    confidences,
    draft_model,
    k,
    mode,
    ctc_threshold,
    confidence_threshold,
    steps,
    fallback_beams,
    stop_at_eos,
    prefill_bucket,
    max_seq_len,
    stats,
    timer,
) -> tuple[list[list[int]], list[RowDecision]]:
    """The rows that need the decoder: the prompt and the draft in one forward, each row's
    decision, then the exact rows decoded. Each row's tokens (its end-of-text included when
    it ended) and what was done for it."""
    eos, device = model.config.eos_token_id, model.decoder.head.weight.device
    batch = len(prompts)
    pad_id = max(model.config.decoder.pad_id, 0)
    joined = [
        torch.cat([p, torch.tensor(d, dtype=p.dtype)]) for p, d in zip(prompts, drafts, strict=True)
    ]
    ids, lengths = engine.right_pad(joined, pad_id, prefill_bucket)
    prompt_lengths = torch.tensor([len(p) for p in prompts])
    read_at = (prompt_lengths - 1)[:, None] + torch.arange(max(map(len, drafts)) + 1)
    read_at = torch.minimum(read_at, lengths[:, None] - 1)
    cache = engine.setup_cache(model, batch, ids.shape[1] + max_new_tokens + k, max_seq_len)
    with stage(timer, "prefill"):
        logits = steps.prefill(
            model,
            ids.to(device),
            read_at.to(device),
            audio_embeds,
            cache.layers,
            prompt_lengths.to(device),
        )
        greedy = logits.argmax(-1).tolist()
    stats.count_forward(batch)
    outputs, records, exact_rows = [], [], []
    for row, draft in enumerate(drafts):
        accepted = accepted_prefix(greedy[row], draft)
        stats.drafted += len(draft)
        stats.accepted += accepted
        outputs.append(greedy[row][: accepted + 1])
        records.append(RowDecision("exact", len(draft), accepted, forwards=1))
        if mode == "relaxed":
            decision = relaxed_decision(
                logits[row, : len(draft)],
                draft,
                confidences[row],
                ctc_threshold,  # never `accepted` here: the confident rows have left
                confidence_threshold,
            )
            records[row].decision = decision
            name = f"relaxed_{decision}"
            setattr(stats, name, getattr(stats, name) + 1)
            if decision != "fallback":
                outputs[row] = [*draft, eos]
                records[row].accepted = len(draft)
                continue
        exact_rows.append(row)
    if exact_rows and mode == "relaxed" and fallback_beams > 1:
        _beam_fallback(
            model,
            prompts,
            audio_embeds,
            max_new_tokens,
            exact_rows,
            outputs,
            records,
            fallback_beams,
            steps,
            stop_at_eos,
            prefill_bucket,
            max_seq_len,
            stats,
            timer,
        )
        return outputs, records
    # Each row goes on from its last token, at the position after its accepted run.
    positions = [int(prompt_lengths[r]) + len(outputs[r]) - 1 for r in range(batch)]
    if draft_model is not None:
        proposer = DraftModel(*draft_model, prompt_lengths, max_new_tokens + k)
    else:
        proposer = DraftLookup(drafts, [len(o) for o in outputs])
    loop_timer = timer if timer is not None and not timer.per_step else None
    with stage(loop_timer, "decode"):
        _decode_rows(
            model,
            outputs,
            positions,
            exact_rows,
            proposer,
            cache,
            max_new_tokens,
            k,
            steps,
            stop_at_eos,
            stats,
            records,
            timer,
        )
    return outputs, records


def _beam_fallback(
    model,
    prompts,
    audio_embeds,
    max_new_tokens,
    rows,
    outputs,
    records,
    num_beams,
    steps,
    stop_at_eos,
    prefill_bucket,
    max_seq_len,
    stats,
    timer,
) -> None:
    """IBM's fallback: `rows` decoded afresh from their prompts by beam search, in a batch of
    their own."""
    device, eos = model.decoder.head.weight.device, model.config.eos_token_id
    audio = audio_embeds
    if audio is not None and len(rows) < len(prompts):
        audio = audio.index_select(0, torch.tensor(rows, device=device))

    def forward(computed: int) -> None:
        stats.count_forward(computed)
        for r in rows:
            records[r].forwards += 1

    tokens = beams.beam_search(
        model,
        [prompts[r] for r in rows],
        audio,
        max_new_tokens,
        num_beams,
        stop_at_eos=stop_at_eos,
        prefill_bucket=prefill_bucket,
        max_seq_len=max_seq_len,
        prefill_step=steps.prefill,
        step=steps.beam,
        on_forward=forward,
        timer=timer,
    )
    for r, out in zip(rows, engine.truncate_at_eos(tokens.cpu(), eos), strict=True):
        outputs[r] = out


def ctc_confident(draft: list[int], confidence: float, ctc_threshold: float) -> bool:
    """IBM's first test: a non-empty CTC draft whose largest frame entropy is at most
    `ctc_threshold` is the answer as it is."""
    return bool(draft) and confidence <= ctc_threshold


def relaxed_decision(
    logits: torch.Tensor,
    draft: list[int],
    confidence: float,
    ctc_threshold: float,
    confidence_threshold: float,
) -> str:
    """IBM's decision for one row: `accepted` (the CTC draft alone), `verified` (each draft
    token probable enough in the verifying forward: logits [len(draft), vocab]) or
    `fallback`."""
    if not draft:
        return "fallback"
    if ctc_confident(draft, confidence, ctc_threshold):
        return "accepted"
    probs = logits.float().softmax(-1)[torch.arange(len(draft)), torch.tensor(draft)]
    return "verified" if bool((probs >= confidence_threshold).all()) else "fallback"


def _decode_rows(
    model,
    outputs,
    positions,
    rows,
    proposer,
    cache,
    max_new_tokens,
    k,
    steps,
    stop_at_eos,
    stats,
    records,
    timer,
) -> None:
    """Decode `rows` to max_new_tokens (or end-of-text): verify proposals where there are
    any, plain decode steps where there are none. Other rows ride along untouched."""
    device, eos = model.decoder.head.weight.device, model.config.eos_token_id
    step_timer = timer if timer is not None and timer.per_step else None

    def live(row: int) -> bool:
        return len(outputs[row]) < max_new_tokens and not (stop_at_eos and eos in outputs[row])

    batch = len(outputs)
    while any(live(r) for r in rows):
        active = [r for r in rows if live(r)]
        width = min(k - 1, max_new_tokens - min(len(outputs[r]) for r in active))
        proposals = proposer.propose(outputs, positions, active, width) if width else {}
        last = torch.tensor([[o[-1]] for o in outputs])  # built on the host, sent once
        where = torch.tensor(positions, device=device)
        with stage(step_timer, "decode"):
            if any(proposals.values()):
                block = torch.full((batch, k), max(model.config.decoder.pad_id, 0))
                block[:, :1] = last
                for r, proposal in proposals.items():
                    block[r, 1 : 1 + len(proposal)] = torch.tensor(proposal, dtype=torch.long)
                span = cache.span(max(positions) + k, steps.fixed_span)
                greedy = steps.verify(model, block.to(device), where, cache.layers, span).tolist()
            else:
                span = cache.span(max(positions) + 1, steps.fixed_span)
                done = torch.zeros(batch, dtype=torch.bool, device=device)
                token, _ = steps.decode(model, last.to(device), where, done, cache.layers, span)
                greedy = token.tolist()
                proposals = {}
        stats.count_forward(batch)
        for r in active:
            proposal = proposals.get(r, [])
            accepted = accepted_prefix(greedy[r], proposal)
            stats.drafted += len(proposal)
            stats.accepted += accepted
            outputs[r] += greedy[r][: accepted + 1]
            positions[r] += accepted + 1
            proposer.accepted(r, proposal, accepted)
            records[r].accepted += accepted
            records[r].forwards += 1
