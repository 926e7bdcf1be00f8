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
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from fms import models

from gsopt.errors import GsoptError
from gsopt.model.checkpoint import _adapter, checkpoint_folder, load_config
from gsopt.model.config import VARIANTS, GraniteSpeechConfig
from gsopt.model.granite_speech import ARCHITECTURE, GraniteSpeech
from gsopt.model.lora import LoraMode, attach_audio_lora


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
) -> GraniteSpeech:
    """This rank's shard of the model (a checkpoint folder, or a variant with random
    weights: each rank then draws its own shards)."""
    world = dist.get_world_size(group)
    config = load_config(source)
    if not isinstance(config, GraniteSpeechConfig):
        raise GsoptError(f"--tp: {source} has no decoder to shard (Granite Speech 5.0 is CTC)")
    check_shardable(config, world)
    variant = str(source) if str(source) in VARIANTS else _variant_for(config)
    folder = None if str(source) in VARIANTS else checkpoint_folder(source)
    # FMS announces "using tensor parallel" on stdout, where transcripts go: send it to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        model = models.get_model(
            ARCHITECTURE,
            variant,
            model_path=str(folder) if folder else None,
            source="hf" if folder else None,
            device_type=torch.device(device).type,
            data_type=dtype,
            distributed_strategy="tp",
            group=group,
        )
    adapter = _adapter(folder) if folder else None
    if adapter is not None and lora != "none":
        attach_audio_lora(model, adapter, lora, shard=(dist.get_rank(group), world))
    return model.eval()


def start(tp: int) -> int:
    """Join the process group torchrun set up for `--tp N` (gloo on CPU, nccl on CUDA);
    returns this process's rank. One rank, no torchrun: nothing to join."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if tp != world:
        raise GsoptError(
            f"--tp {tp}: run under torchrun with one process per shard, e.g. "
            f"torchrun --nproc-per-node {tp} -m gsopt ... --tp {tp} (this run has {world})"
        )
    if tp == 1:
        return 0
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank()


def add_argument(parser) -> None:
    """`--tp N`, as every command that can shard the decoder takes it."""
    parser.add_argument(
        "--tp",
        type=int,
        default=1,
        metavar="N",
        help="shard the decoder across N processes (FMS tensor parallelism); run under "
        "torchrun --nproc-per-node N",
    )
