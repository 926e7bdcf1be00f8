"""`gsopt.transcribe`: the stable face for Python, shaped like Whisper's `transcribe`.

    result = gsopt.transcribe("meeting.flac", model="granite-speech-3.3-2b", recipe="best")
    result["text"], result["segments"]  # [{"id", "start", "end", "text", "tokens"}, ...]

One file gives one dict, a list of files a list of dicts (their windows batched together):
`text`, `segments`, `language`, `duration`, `warnings`, and for Granite Speech 4.1 Plus's
modes `words` or `speakers` with `raw_text`. A loaded model serves many calls:
`gsopt.Transcriber(model, recipe=...).transcribe(files, LongForm(...))`.
"""

from __future__ import annotations

import os
from typing import Any

from gsopt.audio.files import DEFAULT_MAX_AUDIO_SECONDS
from gsopt.runtime import DEFAULT_RECIPE
from gsopt.transcription.longform import LongForm
from gsopt.transcription.prompts import Ask, language_code
from gsopt.transcription.transcriber import DEFAULT_MAX_NEW_TOKENS, Transcriber


def transcribe(
    audio: str | os.PathLike | list[str | os.PathLike],
    *,
    model: str | os.PathLike | None = None,
    recipe: str = DEFAULT_RECIPE,
    device: str | None = None,
    dtype: str | None = None,
    task: str = "transcribe",
    language: str | None = None,
    target_language: str | None = None,
    keywords: tuple[str, ...] | list[str] = (),
    prompt: str | None = None,
    prompt_mode: str = "default",
    prefix_text: str | None = None,
    segmentation: str = "fixed",
    chunk_length: float = 30.0,
    chunk_overlap: float = 0.0,
    clip_timestamps: str | None = None,
    max_new_tokens: int | None = None,
    max_audio_seconds: float = DEFAULT_MAX_AUDIO_SECONDS,
    batch_size: int = 32,
    progress: bool = False,
) -> dict[str, Any] | list[dict[str, Any]]:
    """Recordings of any length to text, with segments in the file's time (see the module).
    The options are the `gsopt transcribe` command's, named as IBM's granite-speech library
    names them; `max_new_tokens` None gives each window 200 tokens per 30 s."""
    ask = Ask(
        task=task,
        language=language_code(language, "language"),
        target_language=language_code(target_language, "target_language"),
        keywords=tuple(keywords),
        prompt_mode=prompt_mode,
    )
    transcriber = Transcriber(
        model,
        recipe=recipe,
        device=device,
        dtype=dtype,
        max_new_tokens=max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
        prompt=prompt,
        ask=ask,
        prefix_text=prefix_text,
    )
    cut = LongForm(
        segmentation=segmentation,
        chunk_length=chunk_length,
        chunk_overlap=chunk_overlap,
        clip_timestamps=clip_timestamps,
        max_audio_seconds=max_audio_seconds,
        max_new_tokens=max_new_tokens,
    )
    return transcriber.transcribe(audio, cut, batch_size=batch_size, progress=progress)
