"""Corpus runs: a manifest of audio files in, one JSON line per input out, resumable, and split
across processes by torchrun.

- Durations come from file headers, so the list is sorted by length before anything is
  decoded, and batches are filled up to a budget of padded audio seconds: the rows of one
  batch have similar lengths, so little of the batch is padding.
- A batch's lines are appended whole, flushed and synced when the batch ends: a crash or
  Ctrl-C loses at most the batch in flight. On start a torn last line (no newline, or not
  JSON: a write cut short) is dropped, so its input is redone; every id already written is
  skipped. A bad file (missing, corrupt, empty, too long) becomes an `error` line, and the
  run goes on.
- Under torchrun every rank reads the same manifest and headers, and each data-parallel
  replica (`gsopt.model.parallel`: one process, or `--tp` shards of one model) takes the
  duration-sorted list dealt round-robin (the same mix of lengths for each). A replica's
  shards run every batch together; its first shard writes the replica's part file. After a
  barrier rank 0 merges the parts into `--out` in manifest order. One process appends to
  `--out` itself and sorts it the same way at the end, so both give the same file.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from gsopt.audio.files import (
    MIN_SAMPLES,
    check_audio_file,
    check_duration,
    load_audio,
    read_recording,
)
from gsopt.audio.frontend import SAMPLE_RATE
from gsopt.errors import GsoptError
from gsopt.model.parallel import Layout
from gsopt.results import write_atomic
from gsopt.transcription.batching import plan_batches
from gsopt.transcription.longform import LongForm, transcribe_recordings
from gsopt.transcription.transcriber import Transcriber, Transcription

log = logging.getLogger(__name__)

# What a folder given as the manifest contributes: files libsndfile reads by their suffix.
AUDIO_SUFFIXES = frozenset(
    {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".au", ".caf", ".w64"}
)
RECORD_START = b'{"id": '  # every result line begins so: `error_record`, `result_record`
MANIFEST_EXAMPLE = '{"audio": "clip.wav", "text": "reference", "id": "clip-1"}'
DEFAULT_BATCH_SIZE = 32
DEFAULT_BATCH_SECONDS = 300.0


@dataclass(frozen=True)
class Entry:
    """One manifest input. `index` is its place in the manifest (the merged output's order);
    `where` names its line for messages."""

    index: int
    id: str
    audio: Path
    reference: str | None
    where: str


# --- manifests -------------------------------------------------------------------------------


def read_manifest(path: str | os.PathLike) -> list[Entry]:
    """A JSONL manifest (one object a line), a CSV with the same columns (`audio`, `text`,
    `id`), or a folder (every audio file in it, recursively). Relative paths resolve against
    the manifest's folder; without an `id` the `audio` value is the id. A malformed line is
    refused naming its line number, before any model is loaded."""
    path = Path(path)
    if path.is_dir():
        entries = _folder_entries(path)
    elif not path.is_file():
        raise GsoptError(f"--manifest {path}: no such file or folder")
    elif path.suffix.lower() == ".csv":
        entries = [_entry(i, where, row, path.parent) for i, (where, row) in enumerate(_csv(path))]
    else:
        entries = [
            _entry(i, where, row, path.parent) for i, (where, row) in enumerate(_jsonl(path))
        ]
    if not entries:
        raise GsoptError(f"--manifest {path}: holds no inputs")
    first: dict[str, str] = {}
    for entry in entries:
        if entry.id in first:
            raise GsoptError(
                f"{entry.where}: id {entry.id!r} repeats {first[entry.id]}; ids must be unique "
                "(without an 'id' field the audio path is the id)"
            )
        first[entry.id] = entry.where
    return entries


def _jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    for number, raw in enumerate(path.read_bytes().splitlines(), 1):
        where = f"{path}:{number}"
        try:
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError:
            raise GsoptError(f"{where}: not UTF-8 text") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise GsoptError(
                f"{where}: not valid JSON ({exc.msg}); each line is one object like "
                f"{MANIFEST_EXAMPLE}"
            ) from None
        if not isinstance(row, dict):
            raise GsoptError(
                f"{where}: a JSON {type(row).__name__}, expected an object like {MANIFEST_EXAMPLE}"
            )
        yield where, row


def _csv(path: Path) -> Iterator[tuple[str, dict]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise GsoptError(f"{path}: not UTF-8 text") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        if "audio" not in (reader.fieldnames or []):
            raise GsoptError(
                f"{path}:1: the header has no 'audio' column (columns: audio, text, id), "
                f"got {reader.fieldnames}"
            )
        for row in reader:
            # csv has no null: an empty cell is an absent value
            yield f"{path}:{reader.line_num}", {k: v for k, v in row.items() if v not in ("", None)}
    except csv.Error as exc:
        raise GsoptError(f"{path}:{reader.line_num}: not valid CSV ({exc})") from None


def _entry(index: int, where: str, row: dict[str, Any], base: Path) -> Entry:
    audio = row.get("audio")
    if not isinstance(audio, str) or not audio.strip():
        got = "no 'audio' field" if audio is None else f"'audio' is {audio!r}"
        raise GsoptError(f"{where}: {got}; expected the audio file's path: {MANIFEST_EXAMPLE}")
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", audio):
        raise GsoptError(
            f"{where}: 'audio' is a URL ({audio}); gsopt reads local files: download it and "
            "give its path"
        )
    text = row.get("text")
    if text is not None and not isinstance(text, str):
        raise GsoptError(f"{where}: 'text' is {type(text).__name__} {text!r}, expected a string")
    key = row.get("id")
    if key is None:
        key = audio
    elif isinstance(key, bool) or not isinstance(key, str | int):
        raise GsoptError(f"{where}: 'id' is {type(key).__name__} {key!r}, expected a string")
    return Entry(index, str(key), base / Path(audio).expanduser(), text, where)


def _folder_entries(folder: Path) -> list[Entry]:
    files = sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file()
    )
    return [
        Entry(i, path.relative_to(folder).as_posix(), path, None, str(path))
        for i, path in enumerate(files)
    ]


# --- output files ----------------------------------------------------------------------------


def part_path(out: Path, rank: int, world: int) -> Path:
    """Where a rank appends: `--out` itself in one process, `OUT.rank{r}.jsonl` under torchrun."""
    return out if world == 1 else out.with_name(f"{out.stem}.rank{rank}{out.suffix}")


def part_files(out: Path) -> list[Path]:
    """Every rank's part file beside `out`, whatever world size wrote it."""
    if not out.parent.is_dir():
        return []
    pattern = re.compile(rf"{re.escape(out.stem)}\.rank\d+{re.escape(out.suffix)}")
    return sorted(p for p in out.parent.iterdir() if pattern.fullmatch(p.name))


def read_records(path: Path, *, repair: bool = False) -> list[dict[str, Any]]:
    """The result lines of an output file. A torn last line (the start of a result line
    without its newline, or not JSON) is a write cut short: it is dropped, and with `repair`
    cut off the file so the next append starts a fresh line. Any other bad line means the
    file is not gsopt's, and it is left alone."""
    if not path.exists():
        return []
    if path.is_dir():
        raise GsoptError(f"--out {path}: is a folder; name a .jsonl file")
    data = path.read_bytes()
    lines = data.split(b"\n")  # the last piece follows the last newline: empty unless torn
    records, kept = [], 0
    for number, raw in enumerate(lines, 1):
        final = number == len(lines)  # no newline after it
        last = final or (number == len(lines) - 1 and not lines[-1].strip())
        record = None
        if raw.strip() and not final:
            with contextlib.suppress(ValueError):  # not JSON, or not UTF-8
                record = json.loads(raw)
        if isinstance(record, dict) and "id" in record:
            records.append(record)
        elif raw.strip() and last and _torn(raw):
            break
        elif raw.strip():
            raise GsoptError(
                f"{path}:{number}: not a gsopt result line; --out names another file? "
                "(choose a new --out)"
            )
        kept += len(raw) + 1
    kept = min(kept, len(data))
    if kept < len(data) and repair:  # unrepaired, it may be another rank's line in flight
        log.warning("%s: dropped a torn last line (a run cut short); its input is redone", path)
        with path.open("r+b") as f:
            f.truncate(kept)
            os.fsync(f.fileno())
    return records


def _torn(raw: bytes) -> bool:
    """The start of one of gsopt's lines (each begins with the id), or the zeros a file
    system can leave after a crash."""
    return raw.startswith(RECORD_START) or RECORD_START.startswith(raw) or not raw.strip(b"\0")


class Appender:
    """Appends each batch's lines in one write, then flushes and syncs: a line is either
    whole on disk or torn at the end, where the next start drops it."""

    def __init__(self, path: Path | None):
        """`path` None: a rank that writes nothing (a replica's other shards)."""
        self.file = None
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = path.open("a", encoding="utf-8")
        except OSError as exc:
            raise GsoptError(f"--out {path}: cannot write there ({exc.strerror})") from None

    def write(self, records: list[dict[str, Any]]) -> None:
        if records and self.file is not None:
            self.file.write("".join(_line(r) for r in records))
            self.file.flush()
            os.fsync(self.file.fileno())

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _line(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n"


def merge(out: Path, entries: list[Entry]) -> list[dict[str, Any]]:
    """`--out` and every part file, one line per id, in manifest order, written atomically;
    the parts are removed after."""
    parts = [p for p in part_files(out) if p != out]
    by_id: dict[str, dict[str, Any]] = {}
    for path in [out, *parts]:
        for record in read_records(path):
            by_id.setdefault(record["id"], record)
    order = {entry.id: entry.index for entry in entries}
    records = sorted(by_id.values(), key=lambda record: order[record["id"]])
    write_atomic(out, "".join(_line(r) for r in records))
    for part in parts:
        part.unlink()
    return records


# --- processes -------------------------------------------------------------------------------


def deal(items: list, layout: Layout) -> list:
    """This replica's share of a duration-sorted list, dealt round-robin like cards."""
    return items[layout.replica :: layout.replicas]


# --- the run ---------------------------------------------------------------------------------


@dataclass
class Summary:
    """What a run did: `inputs` in the manifest, `written` lines in `--out` after the merge,
    `failed` error lines among them; this process's audio seconds and transcription time."""

    out: Path
    inputs: int
    written: int
    failed: int
    audio_seconds: float
    seconds: float
    processes: int = 1

    def line(self) -> str:
        rtfx = self.audio_seconds / self.seconds if self.seconds > 0 else 0.0
        this_run = (
            f"; {'this run' if self.processes == 1 else 'rank 0 this run'}: "
            f"{self.audio_seconds:.1f} s of audio in {self.seconds:.1f} s, "
            f"RTFx {rtfx:.1f}"
            if self.seconds > 0
            else "; nothing left to transcribe"
        )
        failed = (
            f", {self.failed} failed (their lines in {self.out} carry 'error')"
            if self.failed
            else ""
        )
        return f"{self.written - self.failed} of {self.inputs} inputs transcribed{failed}{this_run}"


def probe(entry: Entry, transcriber: Transcriber, cut: LongForm) -> float:
    """Seconds of audio from the header; refuses (GsoptError naming the file) a file that is
    missing, unreadable, empty, past --max-audio-seconds, or (at most --chunk-length long,
    so run whole) too long for the model, before anything is decoded."""
    seconds = check_audio_file(entry.audio)
    check_duration(entry.audio, seconds, cut.max_audio_seconds)
    if seconds * SAMPLE_RATE < MIN_SAMPLES:
        seconds = len(load_audio(entry.audio)) / SAMPLE_RATE  # refuses it: empty or too short
    if seconds <= cut.chunk_length:
        transcriber.check_lengths([entry.audio], [round(seconds * SAMPLE_RATE)])
    return seconds


# Long recordings go through the windowed path in groups of about this much audio: one
# group's windows batch together, and its lines are written when it ends.
LONG_GROUP_SECONDS = 3600.0


def check_resumable(path: Path, records: list[dict[str, Any]], run: dict[str, Any]) -> None:
    """Results from other settings must not mix with this run's: every line carries the
    settings it was made with (`run`), and the first that differs is named."""
    for record in records:
        theirs = record.get("run")
        if theirs == run:
            continue
        if not isinstance(theirs, dict):
            raise GsoptError(
                f"--out {path}: line {record['id']!r} names no run settings (not a gsopt result "
                "file, or an older gsopt's); name a new --out, or add --resume-anyway"
            )
        key = next(k for k in (*run, *theirs) if theirs.get(k) != run.get(k))
        raise GsoptError(
            f"--out {path}: written with {key} {theirs.get(key)!r}, this run has "
            f"{run.get(key)!r}; name a new --out, or add --resume-anyway to mix them"
        )


def error_record(
    entry: Entry, seconds: float | None, message: str, run: dict[str, Any]
) -> dict[str, Any]:
    return {
        "id": entry.id,
        "audio": str(entry.audio),
        "duration_s": None if seconds is None else round(seconds, 4),
        "text": None,
        "tokens": None,
        **({"reference": entry.reference} if entry.reference is not None else {}),
        "error": message,
        "timing": None,
        "run": run,
    }


def result_record(
    entry: Entry, result: Transcription, rank: int, run: dict[str, Any]
) -> dict[str, Any]:
    batch = result.timings
    return {
        "id": entry.id,
        "audio": str(entry.audio),
        "duration_s": round(result.audio_seconds, 4),
        "text": result.text,
        "tokens": result.tokens,
        **({"reference": entry.reference} if entry.reference is not None else {}),
        "timing": {
            "rank": rank,
            "batch": batch.index,
            "batch_size": batch.size,
            "batch_audio_s": round(batch.audio_seconds, 4),
            "batch_wall_s": round(batch.seconds, 6),
            "rtfx": round(batch.rtfx, 3),
            "stages": {name: round(s, 6) for name, s in batch.stages.items()},
        },
        "run": run,
    }


def _long_group(transcriber, group, cut: LongForm, number: int, layout, run_settings):
    """Recordings longer than --chunk-length, windowed and batched together: their lines
    (a window that failed is in the line's `warnings`; the rest of the file is kept)."""
    records, kept, recordings = [], [], []
    for entry, duration in group:
        try:
            recordings.append(read_recording(entry.audio, cut.max_audio_seconds))
            kept.append(entry)
        except GsoptError as exc:
            records.append(error_record(entry, duration, str(exc), run_settings))
    start = time.perf_counter()
    results = transcribe_recordings(transcriber, recordings, cut, batch_size=32)
    wall = time.perf_counter() - start
    audio = sum(r.seconds for r in recordings)
    for entry, result in zip(kept, results, strict=True):
        segments = [{k: v for k, v in s.items() if k != "tokens"} for s in result["segments"]]
        records.append(
            {
                "id": entry.id,
                "audio": str(entry.audio),
                "duration_s": round(result["duration"], 4),
                "text": result["text"],
                "tokens": [t for s in result["segments"] for t in s["tokens"]],
                **({"reference": entry.reference} if entry.reference is not None else {}),
                "segments": segments,
                **({"warnings": result["warnings"]} if result["warnings"] else {}),
                "timing": {
                    "rank": layout.replica,
                    "batch": number,
                    "batch_size": len(kept),
                    "batch_audio_s": round(audio, 4),
                    "batch_wall_s": round(wall, 6),
                    "rtfx": round(audio / wall, 3) if wall > 0 else None,
                    "stages": {},
                },
                "run": run_settings,
            }
        )
    return records


def run(
    entries: list[Entry],
    out: str | os.PathLike,
    transcriber: Transcriber,
    *,
    layout: Layout | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    batch_seconds: float = DEFAULT_BATCH_SECONDS,
    progress: bool = False,
    weights: torch.nn.Module | None = None,
    resume_anyway: bool = False,
    cut: LongForm | None = None,
) -> Summary | None:
    """Transcribe this replica's share of `entries` into its part file, skipping ids
    already written; then rank 0 merges everything into `out` and returns the summary
    (other ranks return None). `layout` is this process's place (`gsopt.model.parallel.join`,
    already joined); `weights`, when given, a model already loaded for the transcriber to
    use or copy. A file written under other settings (`Transcriber.fingerprint`) is refused
    unless `resume_anyway`. The caller leaves the process group."""
    out = Path(out)
    layout = layout or Layout()
    cut = cut or LongForm()
    if batch_size < 1:
        raise GsoptError(f"--batch-size must be at least 1, got {batch_size}")
    if not batch_seconds > 0:
        raise GsoptError(f"--batch-seconds must be above 0, got {batch_seconds}")
    mine = part_path(out, layout.replica, layout.replicas)
    run_settings = {**transcriber.fingerprint, "windows": cut.describe()}
    written = {
        path: read_records(path, repair=path == mine and layout.leader)
        for path in dict.fromkeys([out, *part_files(out), mine])
    }
    done = {record["id"] for records in written.values() for record in records}
    unknown = done - {entry.id for entry in entries}
    if unknown:
        raise GsoptError(
            f"--out {out}: holds {len(unknown)} result(s) for ids not in the manifest (e.g. "
            f"{min(unknown)!r}): it is another run's output; name a new --out"
        )
    if not resume_anyway:
        for path, records in written.items():
            check_resumable(path, records, run_settings)

    # Every rank reads every header, so all deal the same sorted list.
    seconds: dict[int, float] = {}
    problems: dict[int, str] = {}
    for entry in entries:
        try:
            seconds[entry.index] = probe(entry, transcriber, cut)
        except GsoptError as exc:
            problems[entry.index] = str(exc)
    ordered = sorted(entries, key=lambda e: (-seconds.get(e.index, math.inf), e.index))
    todo = [entry for entry in deal(ordered, layout) if entry.id not in done]

    # Every shard of a replica runs every batch (its forward needs them all); its leader
    # writes the lines.
    sink = Appender(mine if layout.leader else None)
    audio_done, spent = 0.0, 0.0
    try:
        bad = [e for e in todo if e.index in problems]
        sink.write([error_record(e, None, problems[e.index], run_settings) for e in bad])
        good = [(e, seconds[e.index]) for e in todo if e.index not in problems]
        long = [(e, s) for e, s in good if s > cut.chunk_length]
        good = [(e, s) for e, s in good if s <= cut.chunk_length]
        if (good or long) and transcriber.pipeline is None:
            transcriber.load(weights)
        with tqdm(
            total=round(sum(s for _, s in good + long), 1),
            unit="s",
            desc="transcribing" if layout.replicas == 1 else f"replica 0 of {layout.replicas}",
            file=sys.stderr,
            disable=None if progress and layout.rank == 0 else True,
        ) as bar:
            start = time.perf_counter()
            for number, batch in enumerate(plan_batches(good, batch_size, batch_seconds)):
                records, kept, waves = [], [], []
                for entry, duration in batch:
                    try:
                        waves.append(load_audio(entry.audio))
                        kept.append(entry)
                    except GsoptError as exc:  # NaN samples, a body that does not decode
                        records.append(error_record(entry, duration, str(exc), run_settings))
                if kept:
                    results = transcriber.run_batch(number, [e.audio for e in kept], waves)
                    pairs = zip(kept, results, strict=True)
                    records += [result_record(e, r, layout.replica, run_settings) for e, r in pairs]
                sink.write(records)
                batch_audio = sum(duration for _, duration in batch)
                audio_done += batch_audio
                spent = time.perf_counter() - start
                bar.update(round(batch_audio, 1))
                bar.set_postfix(RTFx=f"{audio_done / spent:.1f}")
            groups = plan_batches(long, len(long) or 1, LONG_GROUP_SECONDS)
            for number, group in enumerate(groups, len(good)):
                sink.write(_long_group(transcriber, group, cut, number, layout, run_settings))
                group_audio = sum(duration for _, duration in group)
                audio_done += group_audio
                spent = time.perf_counter() - start
                bar.update(round(group_audio, 1))
                bar.set_postfix(RTFx=f"{audio_done / spent:.1f}")
    finally:
        sink.close()
    layout.barrier()
    if layout.rank != 0:
        return None
    records = merge(out, entries)
    failed = sum(1 for r in records if r.get("error") is not None or r.get("warnings"))
    return Summary(out, len(entries), len(records), failed, audio_done, spent, layout.replicas)
