"""gsopt: Granite Speech on IBM's Foundation Model Stack, made fast stage by stage.

The layers, bottom up: `gsopt.model` (configs, the FMS model files, checkpoints),
`gsopt.audio` (files, frontends), `gsopt.engine` (stages, caches, decoding, speculation,
pipelines), `gsopt.recipe` (settings -> stages -> pipeline), `gsopt.measure`,
`gsopt.transcription` (the Python API, corpus runs) and `gsopt.commands` (the CLI).

`import gsopt` alone loads no torch: the names below import their layer on first use, so a
command that needs no model (`gsopt report`) starts at once. Importing `gsopt.model` (which
`gsopt.load_model` does) registers the Granite Speech architectures with FMS.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "GsoptError": "gsopt.errors",
    "load_model": "gsopt.model.checkpoint",
    "VARIANTS": "gsopt.model.config",
    "GraniteSpeechConfig": "gsopt.model.config",
    "get_variant": "gsopt.model.family",
    "GraniteSpeech": "gsopt.model.granite_speech",
    "Transcriber": "gsopt.transcription.transcriber",
    "transcribe": "gsopt.transcription.api",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gsopt' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
