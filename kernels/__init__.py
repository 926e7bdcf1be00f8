"""Triton kernels for gsopt (shipped as `gsopt.kernels`), each beside its plain-torch reference."""
