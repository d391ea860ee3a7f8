"""x @ w for a few rows of fp32 on the CPU (a decode step's projections) through kernels/linear.c,
which reads the weights at the memory's speed where MKL does not (see there); model.py `linear`
calls it and runs torch wherever it returns None."""
import ctypes
import functools

import torch

from kernels import native

MAX_ROWS = 8  # beyond, MKL's blocked product catches up (kernels/linear.c)


@functools.cache
def _compiled():
    library = native.kernels()
    if library is None:
        return None
    function = library.linear_rows
    function.argtypes = [ctypes.c_int] * 3 + [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    function.restype = None
    return function


def linear_rows(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
    """x [..., K] @ w [K, N] -> [..., N] through the C kernel, or None where it does not apply:
    tensors not fp32 on the CPU, w not contiguous, more than MAX_ROWS rows, a product autograd
    must see, no compiled kernel."""
    if not (x.device.type == w.device.type == "cpu" and x.dtype == w.dtype == torch.float32
            and w.dim() == 2 and w.is_contiguous() and x.shape[-1] == w.shape[0]):
        return None
    K, N = w.shape
    rows = x.numel() // K if K else 0
    if not 0 < rows <= MAX_ROWS or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)):
        return None
    function = _compiled()
    if function is None:
        return None
    x2 = x.reshape(rows, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(*x.shape[:-1], N)
    function(rows, K, N, x2.data_ptr(), x2.stride(0), w.data_ptr(), out.data_ptr())
    return out
