"""How a gsopt Triton kernel becomes a torch op that compiled code calls without a break."""

from collections.abc import Callable

from torch.library import custom_op, triton_op
from triton.runtime.interpreter import InterpretedFunction


def kernel_op(name: str, fn: Callable, fake: Callable, kernel: object):
    """A `triton_op` on a GPU (Inductor sees and launches the kernels itself); under
    TRITON_INTERPRET=1 an opaque `custom_op` with a fake impl, because interpreted kernels are
    plain Python that cannot run on the fake tensors `triton_op` traces with."""
    if isinstance(kernel, InterpretedFunction):
        op = custom_op(name, fn, mutates_args=())
        op.register_fake(fake)
        return op
    return triton_op(name, fn, mutates_args=())
