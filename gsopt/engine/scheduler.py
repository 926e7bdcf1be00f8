"""Continuous batching: requests join and leave a static KV cache of S slots between decode
steps, so a row that ends no longer holds the batch while its neighbours run on.

A static batch runs until its longest row ends; rows that finish early leave their slots idle,
and a request that arrives mid-batch waits for the whole batch. Here the scheduler owns one
cache of S rows (slots) and loops:

1. admit: waiting sequences (one window of one request each) take the free slots. Their
   frontend, encoder and projector run as one batch (one per group of similar lengths, so
   little of it is padding), and their prompts are prefilled into the free rows
   (`generate.prefill(..., rows=slots)`), each row at its own positions;
2. decode: the recipe's decode step runs over all S slots at once (one compiled or captured
   graph: fixed shapes, per-row positions, the done mask), a few steps at a time;
3. read the new tokens (the only host sync): a row that said end-of-text, spent its token
   budget or was cancelled frees its slot there and then.

Each row is computed as the same prompt alone (rows keep their own positions, and a row
attends only to positions it wrote), so a sequence's tokens equal the static engine's for
the same clip alone (`tests/test_serve.py` checks it, with rows admitted mid-decode).

Admission policy: fair FIFO by request, with a length budget. Waiting sequences are grouped
by the request they belong to (a long file is many windows); requests take turns in arrival
order, one window per turn, and a request that still has windows goes to the back of the
line. So a short request that arrives behind a flood of long files waits for at most one
window of each request ahead of it, not for their whole files. One admission round takes
sequences in that order while slots are free and the round's padded audio (sequences x the
longest, what the encoder batch costs) stays within `admit_seconds`; the first always goes.
The budget bounds how long an admission stalls the rows already decoding.

Not supported yet (refused on construction, one line): speculative recipes, beam search,
FMS's growing cache, and models without a decoder.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch

from gsopt.audio.frontend import SAMPLE_RATE
from gsopt.engine.generate import _guards_checked_once, default_max_seq_len, right_pad
from gsopt.engine.kv_cache import StaticKVCache
from gsopt.engine.pipeline import Pipeline, prompt_for
from gsopt.errors import GsoptError
from gsopt.model.family import family_of

log = logging.getLogger(__name__)
DEFAULT_ADMIT_SECONDS = 240.0  # padded audio per admission round: 8 windows of 30 s


@dataclass(eq=False)
class Sequence:
    """One clip or window to decode, and what the scheduler fills in.

    `template`: the prompt's ids with one audio placeholder; `group`: the request it belongs
    to (admission takes turns by group); `listener(seq, new_tokens)` is called on the
    scheduler's thread after every read of new tokens and once when the sequence ends
    (`finished` set, `error` holding the exception of a sequence that failed)."""

    waveform: torch.Tensor
    template: list[int]
    max_new_tokens: int
    group: Hashable = None
    listener: Callable[[Sequence, list[int]], None] | None = None
    tokens: list[int] = field(default_factory=list)  # generated ids, end-of-text excluded
    finished: bool = False
    cancelled: bool = False
    error: BaseException | None = None
    submitted: float = 0.0  # perf_counter() times
    admitted: float | None = None

    @property
    def seconds(self) -> float:
        return len(self.waveform) / SAMPLE_RATE


@dataclass
class SchedulerStats:
    """Running totals since start (counters), read by a server's metrics."""

    admitted: int = 0
    finished: int = 0
    cancelled: int = 0
    failed: int = 0
    tokens: int = 0
    audio_seconds: float = 0.0  # of sequences that finished with text
    decode_steps: int = 0
    admissions: int = 0


def unsupported(
    *, speculates: bool, num_beams: int, static_cache: bool, decoder: bool
) -> str | None:
    """Why continuous batching cannot run these settings (one line), or None. Commands ask
    it of a recipe before loading; the scheduler asks it of the stages it is given."""
    if not decoder:
        return "continuous batching needs a decoder; Granite Speech 5.0 (CTC) is not served yet"
    if speculates:
        return (
            "speculative recipes are not supported by continuous batching yet; use best or "
            "compile-decoder"
        )
    if num_beams > 1:
        return (
            f"num_beams = {num_beams}: beam search is not supported by continuous batching "
            "yet; use a greedy recipe"
        )
    if not static_cache:
        return (
            "continuous batching needs the static KV cache (kv_cache = 'static': recipes "
            "static-kv, compile-decoder, best)"
        )
    return None


class Scheduler:
    """Continuous batching over a pipeline's stages (see the module). `submit` and `cancel`
    may be called from any thread; `step` (or `run`) from one thread only."""

    def __init__(
        self,
        pipeline: Pipeline,
        slots: int,
        *,
        positions: int | None = None,
        admit_seconds: float = DEFAULT_ADMIT_SECONDS,
        check_every: int | None = None,
    ):
        """`positions`: cache positions per slot (default the recipe's `max_seq_len` or
        the model's default); `check_every`: decode steps between reads of the tokens
        (default: the recipe's on CUDA, 1 on a CPU, where reading costs no device sync)."""
        plan = pipeline.stages.plan
        reason = unsupported(
            speculates=plan.speculation is not None,
            num_beams=plan.num_beams,
            static_cache=plan.cache.fixed_shapes,
            decoder=family_of(pipeline.model).decoder,
        )
        if reason:
            raise GsoptError(reason)
        if slots < 1:
            raise GsoptError(f"--max-batch must be at least 1, got {slots}")
        if not admit_seconds > 0:
            raise GsoptError(f"the admission budget must be above 0 s, got {admit_seconds}")
        self.pipeline = pipeline
        model = self.model = pipeline.model
        self.plan = plan
        self.slots = slots
        self.admit_seconds = admit_seconds
        device = self.device = pipeline.device
        if check_every is None:
            check_every = plan.check_every if device.type == "cuda" else 1
        self.check_every = max(1, check_every)
        self.positions = positions or plan.max_seq_len or default_max_seq_len(model)
        dec = model.config.decoder
        weight = model.decoder.base_model.embedding.weight
        self.cache = StaticKVCache(
            slots,
            self.positions,
            dec.nlayers,
            model.decoder.base_model.layers[0].attn.kvheads,  # this rank's share under TP
            dec.head_dim,
            weight.dtype,
            weight.device,
        )
        self.eos = model.config.eos_token_id
        self.pad_id = max(dec.pad_id, 0)
        self.token = torch.zeros(slots, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(slots, dtype=torch.long, device=device)
        self.done = torch.ones(slots, dtype=torch.bool, device=device)
        self.rows: list[Sequence | None] = [None] * slots
        self.at: list[int] = [0] * slots  # each row's next position, on the host
        self.turns: deque[Hashable] = deque()  # groups with waiting sequences, in turn order
        self.waiting: dict[Hashable, deque[Sequence]] = {}
        self.lock = threading.Condition()
        self.stats = SchedulerStats()
        self._ids = itertools.count()

    # --- any thread ---------------------------------------------------------------------

    def needed_positions(self, seq: Sequence) -> int:
        config = self.model.config
        audio = config.audio_tokens(len(seq.waveform))
        return len(seq.template) - 1 + audio + seq.max_new_tokens

    def submit(self, seq: Sequence) -> None:
        """Queue a sequence; it is admitted in its request's turn (see the module)."""
        if seq.max_new_tokens < 1:
            raise GsoptError(f"max_new_tokens must be at least 1, got {seq.max_new_tokens}")
        if self.needed_positions(seq) > self.positions:
            raise GsoptError(
                f"the clip, its prompt and {seq.max_new_tokens} new tokens need "
                f"{self.needed_positions(seq)} positions; the scheduler's cache holds "
                f"{self.positions} a slot"
            )
        seq.submitted = time.perf_counter()
        with self.lock:
            group = seq.group if seq.group is not None else ("seq", next(self._ids))
            seq.group = group
            if group not in self.waiting:
                self.waiting[group] = deque()
                self.turns.append(group)
            self.waiting[group].append(seq)
            self.lock.notify_all()

    def cancel(self, seq: Sequence) -> None:
        """Stop a sequence: a waiting one leaves the queue now, a running one frees its slot
        at the next read of the tokens. Its listener hears that it finished."""
        with self.lock:
            if seq.finished or seq.cancelled:
                return
            seq.cancelled = True
            queue = self.waiting.get(seq.group)
            if queue is None or seq not in queue:
                return  # running: `_read` frees it
            queue.remove(seq)
            if not queue:
                self._drop_group(seq.group)
        self._finish(seq)

    @property
    def queued(self) -> int:
        """Sequences waiting for a slot."""
        with self.lock:
            return sum(len(q) for q in self.waiting.values())

    @property
    def queued_seconds(self) -> float:
        with self.lock:
            return sum(s.seconds for q in self.waiting.values() for s in q)

    @property
    def active(self) -> int:
        """Slots holding a sequence."""
        return sum(row is not None for row in self.rows)

    @property
    def idle(self) -> bool:
        return self.active == 0 and self.queued == 0

    # --- the scheduler's thread ---------------------------------------------------------

    def run(self, stop: threading.Event, poll: float = 0.5) -> None:
        """Step until `stop` is set and no work is left (what is queued or running when
        it is set still finishes); sleeps while idle."""
        while True:
            with self.lock:
                while self.active == 0 and not self.waiting and not stop.is_set():
                    self.lock.wait(poll)
                if stop.is_set() and self.active == 0 and not self.waiting:
                    return
            self.step()

    def wake(self) -> None:
        with self.lock:
            self.lock.notify_all()

    def step(self) -> None:
        """Admit into free slots, decode up to `check_every` steps, read the tokens."""
        self._free_cancelled()
        free = [slot for slot, row in enumerate(self.rows) if row is None]
        if free:
            for group in _by_length(self._pick(len(free))):
                self._admit(group, free[: len(group)])
                free = free[len(group) :]
        if self.active:
            try:
                self._decode()
            except Exception as error:  # the rows fail; the engine goes on
                for slot, seq in enumerate(self.rows):
                    if seq is not None:
                        self._release(slot)
                        self._fail(seq, error)

    def drain(self) -> None:
        """Step until every submitted sequence has finished (corpus runs, tests)."""
        while not self.idle:
            self.step()

    def _drop_group(self, group: Hashable) -> None:
        del self.waiting[group]
        self.turns.remove(group)

    def _pick(self, free: int) -> list[Sequence]:
        """The next sequences in turn, within the round's padded-audio budget."""
        picked: list[Sequence] = []
        longest = 0.0
        with self.lock:
            while self.turns and len(picked) < free:
                group = self.turns[0]
                seq = self.waiting[group][0]
                wider = max(longest, seq.seconds)
                if picked and (len(picked) + 1) * wider > self.admit_seconds:
                    break
                self.waiting[group].popleft()
                self.turns.rotate(-1)  # this group had its turn
                if not self.waiting[group]:
                    self._drop_group(group)
                picked.append(seq)
                longest = wider
        return picked

    def _admit(self, picked: list[Sequence], slots: list[int]) -> None:
        """Audio stages and prefill of `picked` into `slots`; a batch that fails is retried
        one sequence at a time, so one sequence's fault fails it alone."""
        try:
            first = self._prefill(picked, slots)
        except Exception as error:  # one request's failure, not the engine's
            if len(picked) == 1:
                self._fail(picked[0], error)
            else:
                for seq, slot in zip(picked, slots, strict=True):
                    self._admit([seq], [slot])
            return
        self.stats.admissions += 1
        now = time.perf_counter()
        for seq, slot, (length, token) in zip(picked, slots, first, strict=True):
            seq.admitted = now
            self.rows[slot] = seq
            self.at[slot] = length
            self.stats.admitted += 1
            self._take(slot, [token])

    @torch.no_grad()
    def _prefill(self, picked: list[Sequence], slots: list[int]) -> list[tuple[int, int]]:
        """Each sequence's prompt length and first token, its row of the cache filled."""
        pipeline, model, config = self.pipeline, self.model, self.model.config
        audio = pipeline.embed_audio([seq.waveform for seq in picked], pipeline.stages)[0]
        prompts = [
            prompt_for(config.audio_tokens(len(seq.waveform)), seq.template, config.audio_token_id)
            for seq in picked
        ]
        ids, lengths = right_pad(prompts, self.pad_id, self.plan.prefill_bucket)
        ids, device_lengths = ids.to(self.device), lengths.to(self.device)
        rows = torch.tensor(slots, device=self.device)
        read_at = (device_lengths - 1)[:, None]
        logits = pipeline.stages.prefill(model, ids, read_at, audio, self.cache.layers, None, rows)
        first = logits.argmax(-1)  # [k, 1]
        self.token[rows] = first
        self.position[rows] = device_lengths
        self.done[rows] = first[:, 0] == self.eos
        return list(zip(lengths.tolist(), first[:, 0].tolist(), strict=True))

    def _decode(self) -> None:
        """Up to `check_every` steps over all slots, never past a row's budget, then read."""
        active = [(slot, seq) for slot, seq in enumerate(self.rows) if seq is not None]
        steps = min(self.check_every, *(s.max_new_tokens - len(s.tokens) for _, s in active))
        longest = max(self.at[slot] for slot, _ in active)
        outputs = []
        token, position, done = self.token, self.position, self.done
        # Free rows stay at position 0 (their writes land in their own, unused row).
        advance = torch.tensor([row is not None for row in self.rows], device=self.device)
        with torch.no_grad():
            for i in range(steps):
                with _guards_checked_once(i):
                    span = self.cache.span(longest + i + 1, self.plan.fixed_span)
                    # A captured step returns its graph's buffers, which the next replay
                    # overwrites: copy before feeding them back (as generate does).
                    token, done = (
                        out.clone()
                        for out in self.pipeline.stages.decode(
                            self.model, token, position, done, self.cache.layers, span
                        )
                    )
                position = position + advance
                outputs.append(token)
        self.token, self.position, self.done = token, position, done
        self.stats.decode_steps += steps
        new = torch.cat(outputs, 1).tolist()  # the host sync
        for slot, _ in active:
            self.at[slot] += steps
            self._take(slot, new[slot])

    def _take(self, slot: int, tokens: list[int]) -> None:
        """A row's new tokens: kept up to end-of-text or the budget; an ended row leaves."""
        seq = self.rows[slot]
        fresh, ended = [], False
        for token in tokens:
            if token == self.eos:
                ended = True
                break
            fresh.append(token)
            if len(seq.tokens) + len(fresh) >= seq.max_new_tokens:
                ended = True
                break
        seq.tokens += fresh
        self.stats.tokens += len(fresh)
        if fresh and not ended:
            _tell(seq, fresh)
        if ended:
            self._release(slot)
            self.stats.audio_seconds += seq.seconds
            self._finish(seq, fresh)

    def _release(self, slot: int) -> None:
        self.rows[slot] = None
        self.at[slot] = 0
        self.done[slot] = True
        self.position[slot] = 0

    def _free_cancelled(self) -> None:
        for slot, seq in enumerate(self.rows):
            if seq is not None and seq.cancelled:
                self._release(slot)
                self._finish(seq)

    def _fail(self, seq: Sequence, error: BaseException) -> None:
        seq.error = error
        self._finish(seq)

    def _finish(self, seq: Sequence, fresh: list[int] | None = None) -> None:
        seq.finished = True
        if seq.cancelled:
            self.stats.cancelled += 1
        elif seq.error is not None:
            self.stats.failed += 1
        else:
            self.stats.finished += 1
        _tell(seq, fresh or [])


def _by_length(picked: list[Sequence]) -> list[list[Sequence]]:
    """A round's sequences in groups of similar length, longest first (each group's
    shortest at least half its longest): the audio stages and the prefill pay for padding,
    and on a CPU batching them saves nothing, so a 2 s clip does not pad to a 30 s one."""
    groups: list[list[Sequence]] = []
    for seq in sorted(picked, key=lambda s: -len(s.waveform)):
        if groups and 2 * len(seq.waveform) >= len(groups[-1][0].waveform):
            groups[-1].append(seq)
        else:
            groups.append([seq])
    return groups


def _tell(seq: Sequence, fresh: list[int]) -> None:
    """The sequence's listener; its failure is logged, never the engine's."""
    if seq.listener is None:
        return
    try:
        seq.listener(seq, fresh)
    except Exception:
        log.exception("a sequence's listener failed")
