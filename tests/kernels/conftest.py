"""Kernel tests run natively on CUDA, and on the CPU through Triton's interpreter otherwise.

TRITON_INTERPRET must be set before any kernel module is decorated by triton.jit, so it is
set here, before the test modules import gsopt.kernels.
"""

import functools
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Kernel vs the fp32 reference, both compared in fp32: (rtol, atol).
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-2, 1e-2), torch.bfloat16: (1e-2, 1e-2)}


@functools.cache
def interpreter_bf16_dot_ok() -> bool:
    """Whether this Triton's interpreter multiplies bf16 values. 3.6 and 3.9 multiply their
    bit patterns; upstream calls bf16 unsupported there (triton-lang/triton#11584)."""
    import triton
    import triton.language as tl

    @triton.jit
    def dot(a_ptr, b_ptr, out_ptr, N: tl.constexpr):
        r = tl.arange(0, N)
        tile = r[:, None] * N + r[None, :]
        tl.store(out_ptr + tile, tl.dot(tl.load(a_ptr + tile), tl.load(b_ptr + tile)))

    a, b = torch.randn(2, 16, 16, dtype=torch.bfloat16)
    out = torch.empty(16, 16)
    dot[(1,)](a, b, out, 16)
    return torch.allclose(out, a.float() @ b.float(), rtol=1e-3, atol=1e-3)


@pytest.fixture
def device() -> str:
    return "cuda" if CUDA else "cpu"


@pytest.fixture(params=list(TOLERANCE), ids=lambda d: str(d).removeprefix("torch."))
def dtype(request) -> torch.dtype:
    if request.param == torch.bfloat16 and not CUDA and not interpreter_bf16_dot_ok():
        pytest.skip("Triton's CPU interpreter computes tl.dot on bf16 bit patterns")
    return request.param


@pytest.fixture
def tol(dtype: torch.dtype) -> dict[str, float]:
    rtol, atol = TOLERANCE[dtype]
    return {"rtol": rtol, "atol": atol}


@pytest.fixture
def poisoned_empty():
    """torch.empty returns NaN, so an output element the kernel never writes fails the test."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)
