"""Attention implementations for the encoder and the decode step, in one registry.

Each entry names the stage it serves, the device types it runs on natively, whether the
Triton interpreter runs it on a CPU (`TRITON_INTERPRET=1`: correctness only, never chosen by
`auto`) and how to get it: the encoder's are block-attention functions
(`gsopt.model.encoder`), the decode step's are FMS attention ops (`gsopt.engine.kv_cache`).
A recipe's `attention` value is checked against this registry when it is parsed; `auto`
picks each stage's first preference that runs natively here. A new kernel is a module, a
`register_attention` line and a test.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from gsopt.engine import kv_cache
from gsopt.model.encoder import math_block_attention, sdpa_block_attention

STAGES = ("encoder", "decode")
AUTO = "auto"


@dataclass(frozen=True)
class Attention:
    name: str
    stage: str
    devices: tuple[str, ...]
    load: Callable[[], Any]  # the block-attention function, or the FMS attention op's name
    interpreted: bool = False  # a Triton kernel: the interpreter runs it on a CPU

    def runs_on(self, device: torch.device) -> bool:
        if device.type in self.devices:
            return True
        return self.interpreted and os.environ.get("TRITON_INTERPRET") == "1"


REGISTRY: dict[str, dict[str, Attention]] = {stage: {} for stage in STAGES}
# What `auto` tries, in order: the first that runs natively on the device.
PREFERENCE = {"encoder": ("sdpa",), "decode": ("triton", "sdpa")}


def register_attention(attention: Attention) -> None:
    REGISTRY[attention.stage][attention.name] = attention


def names(stage: str) -> tuple[str, ...]:
    """The values a recipe may give a stage's `attention`."""
    return (AUTO, *REGISTRY[stage])


def resolve(stage: str, name: str, device: torch.device, notes: list[str]) -> Attention:
    """The implementation that runs for `name` on `device`: `auto`'s choice, or the named
    one, or, where that cannot run here, the stage's portable default (with a note)."""
    if name == AUTO:
        registry = REGISTRY[stage]
        return next(registry[n] for n in PREFERENCE[stage] if device.type in registry[n].devices)
    chosen = REGISTRY[stage][name]
    if chosen.runs_on(device):
        return chosen
    fallback = resolve(stage, AUTO, device, notes)
    where = " or ".join(chosen.devices) + (" (or TRITON_INTERPRET=1)" if chosen.interpreted else "")
    notes.append(f"{stage}: {name} attention needs {where}; ran {fallback.name}")
    return fallback


def _conformer_kernel():
    from gsopt.kernels.conformer_attention import conformer_attention

    return conformer_attention


for _attention in (
    Attention("sdpa", "encoder", ("cpu", "cuda"), lambda: sdpa_block_attention),
    Attention("math", "encoder", ("cpu", "cuda"), lambda: math_block_attention),
    Attention("triton", "encoder", ("cuda",), _conformer_kernel, interpreted=True),
    Attention("sdpa", "decode", ("cpu", "cuda"), lambda: kv_cache.SDPA),
    Attention("triton", "decode", ("cuda",), lambda: kv_cache.TRITON, interpreted=True),
):
    register_attention(_attention)
