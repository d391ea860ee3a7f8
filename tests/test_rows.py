"""kernels/rows.c's few-row product and RMS norm (kernels/rows.py) against torch: shapes the C's
loops split unevenly (K not a multiple of its 8 row streams, or fewer rows; N not a multiple of
its 256-column passes, or fewer columns; odd norm widths), 1 to MAX_ROWS rows, rows of x apart in
memory, every output element written (the output starts as NaN); and where they decline,
model.py runs torch."""
import pytest
import torch

import model
from kernels import rows

TOLERANCE = dict(rtol=1e-5, atol=1e-5)  # fp32, sums in another order (of terms ~1/sqrt(K): outputs ~1)


@pytest.fixture(autouse=True)
def kernel():
    assert rows._compiled() is not None, "no C compiler here: the C product and norm are untested"


@pytest.mark.parametrize("K, N", [(1, 1), (7, 5), (8, 16), (64, 17), (576, 960), (100, 300), (1536, 576),
                                  (33, 4099)])
def test_products_match_torch(K, N):
    torch.manual_seed(K * N)
    w = torch.randn(K, N)
    for M in range(1, rows.MAX_ROWS + 1):
        x = (torch.randn(M, K + 3) / K ** 0.5)[:, 1:K + 1]  # rows K + 3 apart, not 64-byte aligned
        out = torch.full((M, N), float("nan"))
        rows._compiled()[0](M, K, N, x.data_ptr(), x.stride(0), w.data_ptr(), out.data_ptr())
        torch.testing.assert_close(out, x @ w, **TOLERANCE)


def test_product_of_leading_dimensions_and_a_strided_input():
    """A decode step's x is [B, 1, K], or a transposed view (o_proj's input)."""
    w = torch.randn(64, 48) / 8
    for x in [torch.randn(2, 1, 64), torch.randn(1, 64, 3).transpose(1, 2), torch.randn(64)]:
        torch.testing.assert_close(rows.linear_rows(x, w), x @ w, **TOLERANCE)


@pytest.mark.parametrize("D", [1, 7, 64, 576, 1001])
def test_norms_match_torch(D):
    torch.manual_seed(D)
    norm = model.RMSNorm(D, 1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    for M in range(1, rows.MAX_ROWS + 1):
        x = torch.randn(M, 1, D) * 3
        out = torch.full_like(x, float("nan"))
        rows._compiled()[1](M, D, x.data_ptr(), norm.weight.data_ptr(), norm.eps, out.data_ptr())
        expected = norm.weight * torch.nn.functional.rms_norm(x, (D,), eps=norm.eps)
        torch.testing.assert_close(out, expected, **TOLERANCE)
        with torch.no_grad():
            torch.testing.assert_close(norm(x), expected, **TOLERANCE)


@pytest.mark.parametrize("case", ["too many rows", "fp16", "not contiguous", "autograd", "no rows"])
def test_declines_where_torch_runs(case):
    x, w = torch.randn(1, 32), torch.randn(32, 16)
    norm = model.RMSNorm(32, 1e-5)
    if case == "too many rows":
        x = torch.randn(rows.MAX_ROWS + 1, 32)
    elif case == "fp16":
        x, w, norm = x.half(), w.half(), norm.half()
    elif case == "not contiguous":
        x, w = torch.randn(1, 64)[:, ::2], torch.randn(16, 32).t()
    elif case == "autograd":
        x.requires_grad_()
    else:
        x = torch.randn(0, 32)
    with torch.set_grad_enabled(case == "autograd"):
        assert rows.linear_rows(x, w) is None and rows.rms_norm_rows(x, norm.weight, norm.eps) is None
        torch.testing.assert_close(model.linear(x, w), x @ w)
        expected = norm.weight * torch.nn.functional.rms_norm(x.float(), (32,), eps=1e-5).to(x.dtype)
        torch.testing.assert_close(norm(x), expected)
