"""Result files in Whisper's formats: txt, srt, vtt, tsv and json.

SRT cues are numbered from 1 with `HH:MM:SS,mmm --> HH:MM:SS,mmm`; VTT starts with `WEBVTT`
and puts `.` before the milliseconds; TSV is `start\\tend\\ttext` in integer milliseconds.
`max_line_width` wraps a segment's text into lines of at most that many characters (a word
longer than the width gets a line of its own) and `max_line_count` puts at most that many
lines in one cue, the segment's time shared among its cues by their share of characters.
Every file is written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gsopt.errors import GsoptError
from gsopt.results import write_atomic

FORMATS = ("txt", "srt", "vtt", "tsv", "json")
CHOICES = (*FORMATS, "all")


def formats(choice: str) -> tuple[str, ...]:
    if choice not in CHOICES:
        raise GsoptError(f"--output-format {choice!r}: choose one of {', '.join(CHOICES)}")
    return FORMATS if choice == "all" else (choice,)


def timestamp(seconds: float, marker: str) -> str:
    """`HH:MM:SS{marker}mmm`, rounded to the millisecond."""
    ms = round(max(0.0, seconds) * 1000)
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{marker}{ms:03d}"


def _lines(text: str, width: int | None) -> list[str]:
    if width is None:
        return [text] if text else []
    lines: list[str] = []
    for word in text.split():
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines


def cues(
    result: dict[str, Any], max_line_width: int | None = None, max_line_count: int | None = None
) -> list[tuple[float, float, str]]:
    """(start, end, text) for each subtitle cue: a segment, or a segment's wrapped lines
    grouped `max_line_count` at a time."""
    out = []
    for segment in result["segments"]:
        lines = _lines(segment["text"], max_line_width)
        if not lines:
            continue
        per_cue = max_line_count or len(lines)
        groups = [lines[i : i + per_cue] for i in range(0, len(lines), per_cue)]
        start, end = segment["start"], segment["end"]
        total = sum(len(line) for line in lines) or 1
        for group in groups:
            share = (end - segment["start"]) * sum(len(line) for line in group) / total
            stop = end if group is groups[-1] else start + share
            out.append((start, stop, "\n".join(group)))
            start = stop
    return out


def render(
    result: dict[str, Any],
    kind: str,
    max_line_width: int | None = None,
    max_line_count: int | None = None,
) -> str:
    if kind == "txt":
        return "".join(f"{s['text']}\n" for s in result["segments"] if s["text"])
    if kind == "json":
        return json.dumps(result, ensure_ascii=False, indent=2, allow_nan=False) + "\n"
    if kind == "tsv":
        rows = ["start\tend\ttext"]
        rows += [
            f"{round(1000 * s['start'])}\t{round(1000 * s['end'])}\t" + s["text"].replace("\t", " ")
            for s in result["segments"]
            if s["text"]
        ]
        return "\n".join(rows) + "\n"
    listed = cues(result, max_line_width, max_line_count)
    if kind == "srt":
        return "".join(
            f"{n}\n{timestamp(a, ',')} --> {timestamp(b, ',')}\n{text}\n\n"
            for n, (a, b, text) in enumerate(listed, 1)
        )
    return "WEBVTT\n\n" + "".join(
        f"{timestamp(a, '.')} --> {timestamp(b, '.')}\n{text}\n\n" for a, b, text in listed
    )


def write(
    result: dict[str, Any],
    audio: str | Path,
    folder: Path,
    kinds: tuple[str, ...],
    max_line_width: int | None = None,
    max_line_count: int | None = None,
) -> list[Path]:
    """`<folder>/<audio's name without suffix>.<kind>` for each kind; the paths written."""
    written = []
    for kind in kinds:
        path = folder / f"{Path(audio).stem}.{kind}"
        write_atomic(path, render(result, kind, max_line_width, max_line_count))
        written.append(path)
    return written
