"""Will the model fit? Its bytes against the memory this process may use, before loading.

A model too large for the machine otherwise fails deep in an allocator (a 45-line traceback
minutes into a load) or, on Linux, gets the process killed. The estimate is the weights at
the chosen dtype (counted on the meta device, so no memory is touched) plus one row's KV
cache at the decoder's positions; what is available is the least of the host's available
memory, the cgroup's remaining limit and the address-space limit (`ulimit -v`), or the free
memory of the CUDA device.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

import torch

from gsopt.errors import GsoptError
from gsopt.model.family import family_of

GIB = 2**30


def model_bytes(config, dtype: torch.dtype, rows: int = 1) -> int:
    """The weights at `dtype` and `rows` rows of KV cache at the positions a static cache
    starts with (`cache_positions`)."""
    with torch.device("meta"):
        model = family_of(config).model(config)
    itemsize = torch.empty((), dtype=dtype).element_size()
    weights = sum(p.numel() for p in model.parameters()) * itemsize
    if not family_of(config).decoder:
        return weights
    dec = config.decoder
    cache = dec.nlayers * 2 * (dec.kvheads or dec.nheads) * dec.head_dim
    return weights + rows * cache * config.cache_positions * itemsize


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cgroup_available() -> int | None:
    base = Path("/sys/fs/cgroup")
    try:
        limit = (base / "memory.max").read_text().strip()
        used = int((base / "memory.current").read_text())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else int(limit) - used


def _address_space_available() -> int | None:
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        status = Path(f"/proc/{os.getpid()}/status").read_text()
        size = next(int(line.split()[1]) * 1024 for line in status.splitlines() if "VmSize" in line)
    except (OSError, StopIteration):
        size = 0
    return soft - size


def available_bytes(device: torch.device) -> tuple[int | None, str]:
    """Bytes this process can still allocate on `device`, and where that figure comes from."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], f"{device} has free"
    figures = {
        "the host has available": _meminfo_available(),
        "the cgroup limit leaves": _cgroup_available(),
        "the address-space limit (ulimit -v) leaves": _address_space_available(),
    }
    known = {where: value for where, value in figures.items() if value is not None}
    if not known:
        return None, ""
    where = min(known, key=known.get)
    return known[where], where


def check_fits(
    source, config, dtype: torch.dtype, device: torch.device, copies: float = 1, rows: int = 1
) -> None:
    """Refuse in one line a model that cannot fit (`copies`: how many of it the command
    holds at once, e.g. a transformers twin beside it; a tensor-parallel shard is 1 / N;
    `rows`: the batch size, each row a KV cache)."""
    need = round(copies * model_bytes(config, dtype, rows))
    have, where = available_bytes(device)
    if have is not None and need > have:
        dtype_name = str(dtype).removeprefix("torch.")
        raise GsoptError(
            f"{source} needs about {need / GIB:.1f} GiB in {dtype_name} (weights and "
            f"{rows} row(s) of KV cache{f', {copies:g} copies' if copies != 1 else ''}) but "
            f"{where} {max(have, 0) / GIB:.1f} GiB; use --dtype bfloat16, a smaller variant "
            "or a smaller --batch-size, or --no-memory-check to try anyway"
        )
