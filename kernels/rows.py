"""A decode step's work on a few rows of fp32 on the CPU through kernels/rows.c: the products by
the weight matrices (linear_rows: at the memory's speed, where MKL's are not) and the RMS norms
(rms_norm_rows: one call, not six torch operations). model.py calls them and runs torch wherever
they return None."""
import ctypes
import functools

import torch

from kernels import native

MAX_ROWS = 8  # beyond, MKL's blocked product catches up (kernels/rows.c)


@functools.cache
def _compiled():
    """rows.c's linear_rows and rms_norm_rows; None where the C kernels are not built."""
    library = native.kernels()
    if library is None:
        return None
    linear, norm = library.linear_rows, library.rms_norm_rows
    linear.argtypes = [ctypes.c_int] * 3 + [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    norm.argtypes = [ctypes.c_int] * 2 + [ctypes.c_void_p] * 2 + [ctypes.c_float, ctypes.c_void_p]
    linear.restype = norm.restype = None
    return linear, norm


def _applies(*tensors) -> bool:
    """fp32 on the CPU, no autograd to see the result, and the C kernels built."""
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)) and _compiled() is not None)


def linear_rows(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
    """x [..., K] @ w [K, N] -> [..., N] through the C kernel, or None where it does not apply:
    not fp32 on the CPU, w not contiguous, more than MAX_ROWS rows, autograd, no C kernels."""
    if not (w.dim() == 2 and w.is_contiguous() and x.shape[-1] == w.shape[0] and _applies(x, w)):
        return None
    K, N = w.shape
    rows = x.numel() // K if K else 0
    if not 0 < rows <= MAX_ROWS:
        return None
    x2 = x.reshape(rows, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(*x.shape[:-1], N)
    _compiled()[0](rows, K, N, x2.data_ptr(), x2.stride(0), w.data_ptr(), out.data_ptr())
    return out


def rms_norm_rows(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """weight * x / sqrt(mean(x^2) + eps) over x's last dimension through the C kernel, or None
    where it does not apply: not fp32 on the CPU, x not contiguous, more than MAX_ROWS rows,
    autograd, no C kernels."""
    if not (x.is_contiguous() and weight.is_contiguous() and weight.shape == x.shape[-1:] and _applies(x, weight)):
        return None
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if not 0 < rows <= MAX_ROWS:
        return None
    out = torch.empty_like(x)
    _compiled()[1](rows, x.shape[-1], x.data_ptr(), weight.data_ptr(), eps, out.data_ptr())
    return out
