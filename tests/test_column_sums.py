"""H2O's prefill column sums in Triton (memfit.kernels.column_sums) against the PyTorch path of
`memfit.core.scoring.column_sums`. Without CUDA the kernels run in Triton's CPU interpreter (small shapes); with CUDA
the same checks run on the GPU (`-m gpu`) at a longer prompt."""

from __future__ import annotations

import importlib

import pytest
import torch

from memfit.core.scoring import column_sums as reference
from tests.test_kernels import _DEVICES, interpreter_dtype  # noqa: F401 (the fixture is used by name)


@pytest.fixture(params=_DEVICES)
def setup(request: pytest.FixtureRequest) -> tuple[str, torch.dtype, int]:
    """(device, dtype, block size)."""
    if request.param == "interpret":
        dtype = request.getfixturevalue("interpreter_dtype")  # sets TRITON_INTERPRET=1 first
        import memfit.kernels.column_sums as mod

        if type(mod._lse_kernel).__name__ != "InterpretedFunction":
            importlib.reload(mod)
        return "cpu", dtype, 16
    return "cuda", torch.bfloat16, 64


@pytest.mark.parametrize("q_len,t_len", [(37, 37), (5, 50), (40, 45)])
def test_kernel_equals_reference(setup, q_len: int, t_len: int) -> None:
    from memfit.kernels.column_sums import column_sums, supported

    dev, dtype, block = setup
    if dev == "cuda":
        q_len, t_len = q_len * 40, t_len * 40
    torch.manual_seed(0)
    b, h, hkv, d = 2, 4, 2, 16 if dev == "cpu" else 128
    queries = (torch.randn(b, h, q_len, d, device=dev) * 2).to(dtype)
    keys = (torch.randn(b, hkv, t_len, d, device=dev) * 2).to(dtype)
    scaling = d ** -0.5
    assert supported(queries, keys)
    out = column_sums(queries, keys, scaling, block_m=block, block_n=block)
    ref = reference(queries.cpu(), keys.cpu(), scaling).to(out.device)  # the PyTorch path (the kernel serves CUDA)
    assert out.shape == ref.shape == (b, h, t_len) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-4 * q_len)
    if dev == "cuda":  # the scoring function H2O calls takes the kernel on CUDA: the same sums
        from memfit.core import scoring

        assert torch.equal(scoring.column_sums(queries, keys, scaling), column_sums(queries, keys, scaling))
    # every query's probabilities sum to one
    torch.testing.assert_close(out.sum(-1), torch.full((b, h), float(q_len), device=out.device), rtol=1e-4, atol=1e-3)
    # the keys before the first query's position are seen by every query
    if q_len < t_len:
        assert (out[..., : t_len - q_len] > 0).all()


def test_dispatch_keeps_padding_on_the_pytorch_path() -> None:
    """Calls with padding (key or query validity) or on the CPU take the PyTorch path; it is the reference."""
    from memfit.core import scoring

    torch.manual_seed(1)
    q = torch.randn(1, 2, 4, 16)
    k = torch.randn(1, 2, 6, 16)
    valid = torch.ones(1, 2, 6, dtype=torch.bool)
    valid[..., 0] = False
    out = scoring.column_sums(q, k, 0.25, key_valid=valid)
    assert out[..., 0].abs().max() == 0  # an invalid key receives nothing
    torch.testing.assert_close(out.sum(-1), torch.full((1, 2), 4.0))
