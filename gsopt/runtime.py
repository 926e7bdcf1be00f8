"""Device and dtype choices shared by every command, checked into one-line errors."""

from __future__ import annotations

import functools
import math
import time

import torch

from gsopt.errors import GsoptError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# What runs when no recipe is named where one recipe runs: eager stages on gsopt's static KV
# cache (`recipes/static-kv.toml`).
DEFAULT_RECIPE = "static-kv"
CPU_MODEL, CUDA_MODEL = "cpu-small", "3.3-8b"


def default_model(device_type: str) -> str:
    """The one default-model rule of every command: a published size on a GPU, a size a
    2-core CPU runs in seconds otherwise. Either way a variant: random weights."""
    return CUDA_MODEL if device_type == "cuda" else CPU_MODEL


def resolve_device(name: str | None) -> torch.device:
    """`cpu`, `cuda` or `cuda:N`; None picks CUDA when there is one."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise GsoptError(f"unknown device {name!r}: use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GsoptError(
            f"device {name!r}: this machine has no CUDA device (torch {torch.__version__}); "
            "use --device cpu"
        )
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise GsoptError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """A dtype name; None is bfloat16 on CUDA (as the checkpoints ship) and float32 on CPU."""
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise GsoptError(f"unknown dtype {name!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)


# The x86 flags that pick a CPU's compute kernels: BF16 dot products (Zen 4, Sapphire
# Rapids), int8 dot products (VNNI), the AMX tile units, and the byte permutes (VBMI) and
# byte/word ops (BW) gsopt's int4 kernels need besides VNNI (`gsopt.kernels.cpu_kernels`).
CPU_FEATURES = (
    "avx512_bf16",
    "amx_bf16",
    "avx512_vnni",
    "avx_vnni",
    "amx_int8",
    "avx512bw",
    "avx512vbmi",
)


def cpu_features() -> tuple[str, ...]:
    """Which of `CPU_FEATURES` this CPU has (Linux's /proc/cpuinfo; none elsewhere): torch
    reports only the vector width (`get_cpu_capability`), not the dot-product units."""
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line for line in info if line.startswith("flags")), "").split()
    except OSError:
        return ()
    return tuple(f for f in CPU_FEATURES if f in flags)


def has_bf16_dot() -> bool:
    """Whether bf16 GEMMs run on BF16 dot-product units here, rather than converting to fp32."""
    return any(f in cpu_features() for f in ("avx512_bf16", "amx_bf16"))


@functools.cache
def bf16_gemm_outruns_fp32() -> bool:
    """Whether a bf16 GEMM beats an fp32 one here by a clear margin (1.2x), measured once per
    process on an encoder-sized product. Having BF16 dot products is not enough: a 2-core EPYC
    (Zen 4/5) runs bf16 GEMMs at 2-3x its fp32 rate, a 2-core Xeon whose host hides AMX at
    0.6x (`vdpbf16ps` there issues on one port, fp32 FMAs on two)."""
    if not has_bf16_dot():
        return False
    rates = {}
    for dtype in (torch.float32, torch.bfloat16):
        x, w = torch.randn(256, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
        best = math.inf
        for _ in range(12):  # the first calls warm oneDNN's kernels up
            start = time.perf_counter()
            torch.nn.functional.linear(x, w)
            best = min(best, time.perf_counter() - start)
        rates[dtype] = 1 / best
    return rates[torch.bfloat16] > 1.2 * rates[torch.float32]
