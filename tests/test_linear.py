"""kernels/linear.c's few-row product (kernels/linear.py) against torch: shapes the C's loops
split unevenly (K not a multiple of its 8 row streams, or fewer rows; N not a multiple of its
256-column passes, or fewer columns), 1 to MAX_ROWS rows, rows of x apart in memory, every output
element written (the output starts as NaN); and where it declines, model.py runs torch."""
import pytest
import torch

import model
from kernels import linear

TOLERANCE = dict(rtol=1e-5, atol=1e-5)  # fp32, sums in another order (of terms ~1/sqrt(K): outputs ~1)


@pytest.fixture(autouse=True)
def kernel():
    assert linear._compiled() is not None, "no C compiler here: the C product is untested"


@pytest.mark.parametrize("K, N", [(1, 1), (7, 5), (8, 16), (64, 17), (576, 960), (100, 300), (1536, 576),
                                  (33, 4099)])
def test_rows_match_torch(K, N):
    torch.manual_seed(K * N)
    w = torch.randn(K, N)
    for M in range(1, linear.MAX_ROWS + 1):
        x = (torch.randn(M, K + 3) / K ** 0.5)[:, 1:K + 1]  # rows K + 3 apart, not 64-byte aligned
        out = torch.full((M, N), float("nan"))
        linear._compiled()(M, K, N, x.data_ptr(), x.stride(0), w.data_ptr(), out.data_ptr())
        torch.testing.assert_close(out, x @ w, **TOLERANCE)


def test_leading_dimensions_and_a_strided_input():
    """A decode step's x is [B, 1, K], or a transposed view (o_proj's input)."""
    w = torch.randn(64, 48) / 8
    for x in [torch.randn(2, 1, 64), torch.randn(1, 64, 3).transpose(1, 2), torch.randn(64)]:
        torch.testing.assert_close(linear.linear_rows(x, w), x @ w, **TOLERANCE)


@pytest.mark.parametrize("case", ["too many rows", "fp16", "w not contiguous", "autograd", "no rows"])
def test_declines_where_torch_runs(case):
    x, w = torch.randn(1, 32), torch.randn(32, 16)
    if case == "too many rows":
        x = torch.randn(linear.MAX_ROWS + 1, 32)
    elif case == "fp16":
        x, w = x.half(), w.half()
    elif case == "w not contiguous":
        w = torch.randn(16, 32).t()
    elif case == "autograd":
        w.requires_grad_()
    else:
        x = torch.randn(0, 32)
    assert linear.linear_rows(x, w) is None
    with torch.set_grad_enabled(case == "autograd"):
        torch.testing.assert_close(model.linear(x, w), x @ w)
