"""Tensor-parallel decoding through FMS's own sharding (`distributed_strategy="tp"`).

Under `torchrun`, every rank loads the model through FMS's `get_model` with a tensor-parallel
strategy: each decoder layer's attention heads split column-wise (q, k, v each cut into the
ranks' contiguous head groups) and its dense and down projections row-wise, followed by an
all-reduce; the encoder, projector, embedding and head stay whole on every rank. FMS reads
only each rank's slices of the checkpoint's tensors. The audio LoRA is attached after the
load, each rank taking the adapter rows of its slice, so a merged LoRA is sharded with its
weight. The static KV cache then holds each rank's own kv heads, and the decode step
compiles per rank.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from fms import models
from fms.utils import serialization

from gsopt.errors import GsoptError
from gsopt.model.checkpoint import _adapter, checkpoint_folder, load_config, random_model
from gsopt.model.config import GraniteSpeechConfig
from gsopt.model.family import family_of, is_variant
from gsopt.model.granite_speech import ARCHITECTURE, GraniteSpeech
from gsopt.model.lora import LoraMode, attach_audio_lora, random_adapter


def check_shardable(config: GraniteSpeechConfig, world_size: int) -> None:
    """Refuse, before any weight is read, a decoder whose heads do not split evenly."""
    dec = config.decoder
    for name, heads in (("attention heads", dec.nheads), ("kv heads", dec.kvheads or dec.nheads)):
        if heads % world_size:
            raise GsoptError(
                f"--tp {world_size}: the decoder's {heads} {name} do not divide by "
                f"{world_size}; choose a tensor-parallel size that divides {heads}"
            )


def _variant_for(config: GraniteSpeechConfig) -> str:
    """FMS builds models from registered variants: register one for this checkpoint's own
    config (read from its config.json), named by a digest of it."""
    name = "config-" + hashlib.sha1(repr(config).encode()).hexdigest()[:12]
    if name not in models.list_variants(ARCHITECTURE):
        models.register_model(ARCHITECTURE, name, lambda **kw: GraniteSpeech(config, **kw))
    return name


def load_tensor_parallel(
    source: str | Path,
    *,
    group: dist.ProcessGroup | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    lora: LoraMode = "merged",
    seed: int = 0,
) -> GraniteSpeech:
    """This rank's shard of the model: a checkpoint folder (FMS reads only this rank's
    slices), or a variant, whose random weights are drawn whole, exactly as one process
    draws them (`load_model(..., seed)`), and then sharded, so N shards compute what one
    process computes."""
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    config = load_config(source)
    if not family_of(config).decoder:
        raise GsoptError(f"--tp: {source} has no decoder to shard (Granite Speech 5.0 is CTC)")
    check_shardable(config, world)
    variant = is_variant(source)
    folder = None if variant else checkpoint_folder(source)
    # FMS announces "using tensor parallel" on stdout of every rank, where transcripts go:
    # once, on stderr.
    with contextlib.redirect_stdout(sys.stderr if rank == 0 else io.StringIO()):
        model = models.get_model(
            ARCHITECTURE,
            str(source) if variant else _variant_for(config),
            model_path=str(folder) if folder else None,
            source="hf" if folder else None,
            device_type=torch.device(device).type,
            data_type=dtype,
            distributed_strategy="tp",
            group=group,
        )
    if variant:
        whole = random_model(str(source), device=device, dtype=dtype, seed=seed)
        serialization.load_state_dict_into_model(
            model,
            whole.state_dict(),
            ARCHITECTURE,
            "fms",
            dtype=dtype,
            distributed_strategy="tp",
            initial_device=torch.device(device),
            rank=rank,
        )
        model.post_init()
        adapter = random_adapter(config, torch.Generator().manual_seed(seed))
    else:
        adapter = _adapter(folder)
    if adapter is not None and config.lora_rank and lora != "none":
        attach_audio_lora(model, adapter, lora, shard=(rank, world))
    return model.eval()
