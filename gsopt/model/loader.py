"""One road to loaded models: the target, whole or as this rank's tensor-parallel shard, and
the draft model a speculative recipe asks for, checked against the target before any weight
is read."""

from __future__ import annotations

from pathlib import Path

import torch

from gsopt.errors import GsoptError
from gsopt.model.checkpoint import load_config, load_model
from gsopt.model.family import family_of
from gsopt.model.lora import LoraMode
from gsopt.model.memory import check_fits
from gsopt.model.parallel import Layout
from gsopt.model.tensor_parallel import load_tensor_parallel
from gsopt.model.tokenizer import TOKENIZER_FILES, load_tokenizer


def load_target(
    source: str | Path,
    *,
    device: torch.device,
    dtype: torch.dtype,
    layout: Layout | None = None,
    lora: LoraMode = "live",
    seed: int = 0,
    memory_check: bool = True,
) -> torch.nn.Module:
    """The model to run: whole, or this rank's shard when the layout is tensor-parallel;
    refused first if it cannot fit (`gsopt.model.memory`) unless `memory_check` is off."""
    shards = layout.tp if layout is not None else 1
    if memory_check:
        check_fits(source, load_config(source), dtype, torch.device(device), 1 / shards)
    if shards > 1:
        return load_tensor_parallel(
            source, group=layout.tp_group, device=device, dtype=dtype, lora=lora, seed=seed
        )
    return load_model(source, device=device, dtype=dtype, lora=lora, seed=seed)


def load_draft_model(
    source: str | Path,
    target_config,
    *,
    device: torch.device,
    dtype: torch.dtype,
    target_source: str | Path | None = None,
) -> torch.nn.Module:
    """A draft model for a target, refused (before any weight is read) unless it reads and
    writes the same tokens: the same vocabulary, audio and end-of-text ids, and the same
    tokenizer where both are checkpoint folders. Always whole (it is small), LoRA merged."""
    config = load_config(source)
    if not family_of(config).decoder:
        raise GsoptError(f"draft model {source}: it has no decoder to draft with")
    mine = target_config
    draft_ids = (config.decoder.src_vocab_size, config.audio_token_id, config.eos_token_id)
    target_ids = (mine.decoder.src_vocab_size, mine.audio_token_id, mine.eos_token_id)
    if draft_ids != target_ids:
        raise GsoptError(
            f"draft model {source}: its vocabulary (size, audio and end-of-text ids "
            f"{draft_ids}) differs from the target's {target_ids}; a draft must share the "
            "target's tokenizer"
        )
    folders = [s for s in (source, target_source) if s is not None and Path(s).is_dir()]
    if len(folders) == 2 and all(
        any((Path(f) / n).exists() for n in TOKENIZER_FILES) for f in folders
    ):
        vocabularies = [
            load_tokenizer(f, c).get_vocab() for f, c in zip(folders, (config, mine), strict=True)
        ]
        if vocabularies[0] != vocabularies[1]:
            raise GsoptError(f"draft model {source}: its tokenizer differs from the target's")
    return load_model(source, device=device, dtype=dtype, lora="merged")


def load_models(
    source: str | Path,
    *,
    device: torch.device,
    dtype: torch.dtype,
    draft: str | Path | None = None,
    layout: Layout | None = None,
    lora: LoraMode = "live",
    memory_check: bool = True,
) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """The target and, when `draft` names one, its draft model (checked first: a draft that
    cannot serve the target is refused before the target's weights are read)."""
    draft_model = None
    if draft is not None:
        draft_model = load_draft_model(
            draft, load_config(source), device=device, dtype=dtype, target_source=source
        )
    target = load_target(
        source, device=device, dtype=dtype, layout=layout, lora=lora, memory_check=memory_check
    )
    return target, draft_model
