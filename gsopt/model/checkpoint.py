"""Load Granite Speech: a named variant with random weights, or a local Hugging Face snapshot.

Three model types: `granite_speech` and `granite_speech_plus` load as `GraniteSpeech`,
`granite_speech5_ctc` (5.0) as `GraniteSpeechCTC`. Real snapshots hold stale extra shards
beside the current ones, so the shard set comes from `model.safetensors.index.json` (never a
glob), and files beside the weights that are not weights (granite-speech-4.1's BPE CTC head
`out_llm.safetensors`) are read on their own terms. Every key and shape is checked before
any weight is copied, and each problem is reported as one `GsoptError` naming keys or files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import sys
from collections import ChainMap
from collections.abc import Iterator
from pathlib import Path

import torch
from fms.utils import serialization
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from gsopt.errors import GsoptError
from gsopt.model.config import (
    MODEL_TYPES,
    GraniteSpeechConfig,
    GraniteSpeechCTCConfig,
    from_hf_config,
)
from gsopt.model.family import family_of, get_variant, is_variant, variant_family, variant_names
from gsopt.model.granite_speech import GraniteSpeech
from gsopt.model.granite_speech5 import FP32BatchNorm1d, GraniteSpeechCTC
from gsopt.model.lora import (
    LORA_MODES,
    LoraMode,
    attach_audio_lora,
    parse_peft_adapter,
    random_adapter,
)
from gsopt.results import read_json

INDEX_FILE = "model.safetensors.index.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
OUT_LLM_FILE = "out_llm.safetensors"  # granite-speech-4.1's BPE CTC head: weight, bias
OUT_LLM_PREFIX = "encoder.out_llm."
_SHOWN_KEYS = 5
_CPU = torch.device("cpu")


def _listing(keys: set[str] | list[str]) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - _SHOWN_KEYS} more" if len(keys) > _SHOWN_KEYS else ""
    return ", ".join(keys[:_SHOWN_KEYS]) + more


def weight_files(folder: Path) -> dict[Path, set[str] | None]:
    """The shards to read, each with the keys the index assigns it (None: take all)."""
    index = folder / INDEX_FILE
    if index.exists():
        weight_map: dict[str, str] = read_json(index).get("weight_map", {})
        shards: dict[Path, set[str] | None] = {}
        for key, shard in weight_map.items():
            shards.setdefault(folder / shard, set()).add(key)
        missing = [p.name for p in shards if not p.exists()]
        if missing:
            raise GsoptError(
                f"{folder}: shard(s) {_listing(missing)} listed in {INDEX_FILE} are missing; "
                "download the complete snapshot"
            )
        return shards
    single = folder / "model.safetensors"
    if single.exists():
        return {single: None}
    raise GsoptError(
        f"{folder}: no model.safetensors or {INDEX_FILE}; is this a checkpoint folder?"
    )


def _is_granite_speech(folder: Path) -> bool:
    """A folder of any Granite Speech model type (3.x to 5.0)."""
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type") in MODEL_TYPES
    except (OSError, json.JSONDecodeError):
        return False


def _index_aware(load_state_dict):
    """FMS's `get_model(..., model_path=DIR, source="hf")` reads every `*.safetensors` in DIR:
    a real Granite Speech snapshot holds stale shards beside the current ones (a stale key
    can win), and granite-speech-4.1's `out_llm.safetensors` names its tensors `weight` and
    `bias`. For Granite Speech folders, read the indexed shards (or model.safetensors) and
    the BPE CTC head under its module's name (checked against config.json); every other call
    goes to FMS unchanged. FMS builds the model from the variant before it sees the files,
    and variants describe config.json only, so ask for the head with
    `get_model(..., encoder={"bpe_output_dim": 100353})`; without it the head's tensors are
    left unused, as FMS warns."""

    @functools.wraps(load_state_dict)
    def load(model_path, *, source=None, initial_device=_CPU, **kwargs):
        folder = Path(str(model_path)) if model_path is not None else None
        if (
            source == "hf"
            and initial_device.type != "meta"
            and not kwargs.get("checkpoint_sharding")
            and folder is not None
            and folder.is_dir()
            and _is_granite_speech(folder)
        ):
            shards = [
                serialization._load_safetensors_state_dict(shard, initial_device)
                for shard in weight_files(folder)
            ]
            config = load_config(folder)  # checks the head's shapes, if there is one
            if isinstance(config, GraniteSpeechConfig) and config.encoder.bpe_output_dim:
                shards.append(_read_out_llm(folder, initial_device))
            return ChainMap(*shards)
        return load_state_dict(model_path, source=source, initial_device=initial_device, **kwargs)

    return load


serialization.load_state_dict = _index_aware(serialization.load_state_dict)


def _read_tensors(files: dict[Path, set[str] | None]) -> dict[str, torch.Tensor]:
    """Read the listed tensors, with a progress bar for big checkpoints (stderr, tty only)."""
    total = sum(p.stat().st_size for p in files)
    state_dict: dict[str, torch.Tensor] = {}
    with tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc="loading weights",
        file=sys.stderr,
        disable=None if total > 256 * 2**20 else True,
    ) as bar:
        for path, wanted in files.items():
            try:
                with safe_open(path, framework="pt") as f:
                    present = set(f.keys())
                    keys = present if wanted is None else wanted
                    absent = keys - present
                    if absent:
                        raise GsoptError(
                            f"{path.name}: lacks {_listing(absent)} that {INDEX_FILE} places there"
                        )
                    for key in sorted(keys):
                        state_dict[key] = f.get_tensor(key)
            except SafetensorError as e:
                raise GsoptError(f"{path}: not a readable safetensors file ({e})") from None
            bar.update(path.stat().st_size)
    return state_dict


def _check_state_dict(
    model: GraniteSpeech | GraniteSpeechCTC, state_dict: dict[str, torch.Tensor]
) -> None:
    expected = model.state_dict()
    tied = isinstance(model, GraniteSpeech) and model.config.decoder.tie_heads
    optional = {"decoder.head.weight"} if tied else set()
    missing = expected.keys() - state_dict.keys() - optional
    unexpected = state_dict.keys() - expected.keys()
    if missing:
        raise GsoptError(f"checkpoint is missing {len(missing)} weight(s): {_listing(missing)}")
    if unexpected:
        raise GsoptError(
            f"checkpoint has {len(unexpected)} unexpected weight(s): {_listing(unexpected)}"
        )
    for key, tensor in state_dict.items():
        if tensor.shape != expected[key].shape:
            raise GsoptError(
                f"checkpoint weight {key} has shape {tuple(tensor.shape)}, the config.json "
                f"model expects {tuple(expected[key].shape)}"
            )


def _adapter(folder: Path) -> dict | None:
    """The peft adapter's tensors grouped by layer, or None when the folder has none."""
    if not (folder / ADAPTER_CONFIG).exists():
        return None
    weights = folder / ADAPTER_WEIGHTS
    if not weights.exists():
        raise GsoptError(f"{folder}: {ADAPTER_CONFIG} is present but {ADAPTER_WEIGHTS} is missing")
    try:
        with safe_open(weights, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise GsoptError(f"{weights}: not a readable safetensors file ({e})") from None
    return parse_peft_adapter(tensors)


def checkpoint_folder(source: str | Path) -> Path:
    folder = Path(source)
    if not folder.is_dir():
        raise GsoptError(
            f"{source}: neither a variant ({', '.join(variant_names())}) nor a checkpoint folder"
        )
    return folder


def _out_llm_rows(folder: Path, config: GraniteSpeechConfig) -> int:
    """Rows of the BPE CTC head in `out_llm.safetensors`, after checking its shapes against
    config.json (header only: no tensor is read)."""
    path = folder / OUT_LLM_FILE
    vocab, hidden = config.decoder.src_vocab_size, config.encoder.hidden_dim
    expected = {"weight": (vocab, hidden), "bias": (vocab,)}
    try:
        with safe_open(path, framework="pt") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except SafetensorError as e:
        raise GsoptError(f"{path}: not a readable safetensors file ({e})") from None
    if shapes.keys() != expected.keys():
        raise GsoptError(
            f"{path.name}: holds {_listing(list(shapes))}, expected exactly weight and bias"
        )
    for key, shape in expected.items():
        if shapes[key] != shape:
            raise GsoptError(
                f"{path.name}: {key} has shape {shapes[key]}, expected {shape} "
                f"(text_config.vocab_size {vocab} x encoder_config.hidden_dim {hidden})"
            )
    return vocab


def _read_out_llm(folder: Path, device: torch.device = _CPU) -> dict[str, torch.Tensor]:
    """The BPE CTC head's tensors under the encoder's `out_llm` module names."""
    with safe_open(folder / OUT_LLM_FILE, framework="pt", device=str(device)) as f:
        return {OUT_LLM_PREFIX + key: f.get_tensor(key) for key in f.keys()}


def load_config(source: str | Path) -> GraniteSpeechConfig | GraniteSpeechCTCConfig:
    """The config alone, no weights read (so inputs can be checked before a long load): a
    variant's, or the folder's config.json with its adapter_config.json if any; with
    out_llm.safetensors beside the weights, the encoder gets its BPE CTC head."""
    if is_variant(source):
        return get_variant(str(source))
    folder = checkpoint_folder(source)
    adapter_file = folder / ADAPTER_CONFIG
    adapter_config = read_json(adapter_file) if adapter_file.exists() else None
    config = from_hf_config(
        read_json(folder / "config.json", "not found; a checkpoint folder needs config.json"),
        adapter_config,
    )
    if isinstance(config, GraniteSpeechConfig) and (folder / OUT_LLM_FILE).exists():
        encoder = dataclasses.replace(config.encoder, bpe_output_dim=_out_llm_rows(folder, config))
        config = dataclasses.replace(config, encoder=encoder)
    return config


def _cast(
    model: GraniteSpeech | GraniteSpeechCTC, state_dict: dict[str, torch.Tensor], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Floating tensors to `dtype`, except those of modules that compute in float32."""
    fp32 = tuple(
        f"{name}." for name, module in model.named_modules() if isinstance(module, FP32BatchNorm1d)
    )
    return {
        key: tensor.to(torch.float32 if key.startswith(fp32) else dtype)
        if tensor.is_floating_point()
        else tensor
        for key, tensor in state_dict.items()
    }


def load_checkpoint(
    folder: Path, dtype: torch.dtype, lora: LoraMode
) -> GraniteSpeech | GraniteSpeechCTC:
    config = load_config(folder)
    tensors = _read_tensors(weight_files(folder))
    adapter = None
    if family_of(config).decoder:
        adapter = _adapter(folder)
        if config.encoder.bpe_output_dim:
            tensors.update(_read_out_llm(folder))
    model = from_hf_state_dict(config, tensors, dtype)
    if adapter is not None:
        attach_audio_lora(model, adapter, lora)
    return model


def from_hf_state_dict(
    config: GraniteSpeechConfig | GraniteSpeechCTCConfig,
    tensors: dict[str, torch.Tensor],
    dtype: torch.dtype,
) -> GraniteSpeech | GraniteSpeechCTC:
    """A model from a Hugging Face state dict, on the tensors' device (a checkpoint's read
    from disk, or a transformers model's own, with no round trip through files)."""
    family = family_of(config)
    with torch.device("meta"):
        model = family.model(config)
    state_dict = serialization.get_adapted(
        family.architecture, "hf", tensors, {"model_config": config}
    )
    _check_state_dict(model, state_dict)
    model.load_state_dict(_cast(model, state_dict, dtype), strict=False, assign=True)
    model.post_init()
    return model


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def random_model(
    variant: str, *, device: str | torch.device, dtype: torch.dtype, seed: int = 0
) -> GraniteSpeech | GraniteSpeechCTC:
    """A variant with random weights (no adapter), built as FMS's `get_model` builds one:
    on the meta device in `dtype`, then materialised where it will run (an 8B init on a GPU
    takes seconds) and reset. Not through `get_model` itself, which shards any model
    tensor-parallel once a process group of several ranks exists."""
    family = variant_family(variant)
    torch.manual_seed(seed)
    with torch.device("meta"), _default_dtype(dtype):
        model = family.model(family.variants[variant])
    model.to_empty(device=device)
    model.reset_parameters()
    model.post_init()
    return model


def load_model(
    source: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    lora: LoraMode = "live",
    seed: int = 0,
) -> GraniteSpeech | GraniteSpeechCTC:
    """A variant name (random weights, random adapter of the published rank) or a checkpoint
    folder (config.json, safetensors shards, optional adapter_config.json +
    adapter_model.safetensors, optional out_llm.safetensors). `lora` is `live`, `merged` or
    `none`. Granite Speech 5.0 (a `granite_speech5_ctc` folder or a CTC variant) gives a
    `GraniteSpeechCTC`, which has no LoRA; everything else a `GraniteSpeech`."""
    if lora not in LORA_MODES:
        raise GsoptError(f"unknown lora mode {lora!r}: choose one of {', '.join(LORA_MODES)}")
    if is_variant(source):
        model = random_model(str(source), device=device, dtype=dtype, seed=seed)
        config = model.config
        if getattr(config, "lora_rank", 0):
            generator = torch.Generator().manual_seed(seed)
            attach_audio_lora(model, random_adapter(config, generator), lora)
    else:
        model = load_checkpoint(checkpoint_folder(source), dtype, lora)
    return model.to(device).eval()
