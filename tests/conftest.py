"""Triton kernels run on the CPU under the interpreter; it must be on before any kernel
module is imported, for every test that can reach one (kernels and recipes alike)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
