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


def test_a_given_log_sum_exp_skips_the_first_pass(setup) -> None:
    """With each query's log-sum-exp handed in (what the prompt's flash attention returns), the kernel runs only its
    column pass and gives the same sums; a wrong log-sum-exp shows (the sums no longer add up to one per query)."""
    from memfit.kernels.column_sums import column_sums

    dev, dtype, block = setup
    torch.manual_seed(2)
    b, h, hkv, n, d = 1, 4, 2, 33 if dev == "cpu" else 1500, 16 if dev == "cpu" else 128
    queries = (torch.randn(b, h, n, d, device=dev) * 2).to(dtype)
    keys = (torch.randn(b, hkv, n, d, device=dev) * 2).to(dtype)
    scaling = d ** -0.5
    logits = (queries.float() @ keys.float().repeat_interleave(h // hkv, 1).transpose(-1, -2)) * scaling
    logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool, device=dev).triu(1), float("-inf"))
    lse = torch.logsumexp(logits, -1)
    both = column_sums(queries, keys, scaling, block_m=block, block_n=block)
    given = column_sums(queries, keys, scaling, block_m=block, block_n=block, lse=lse)
    torch.testing.assert_close(given, both, rtol=2e-3, atol=2e-4 * n)
    off = column_sums(queries, keys, scaling, block_m=block, block_n=block, lse=lse + 1.0)
    torch.testing.assert_close(off.sum(-1), torch.full((b, h), n / torch.e, device=off.device), rtol=1e-3, atol=1e-3)


def test_methods_that_read_the_prompt_log_sum_exp() -> None:
    """H2O asks the cache for the prompt's log-sum-exp (alone and composed with a quantizer); other methods do not."""
    from memfit.core.method import build_policy

    assert build_policy("h2o", 0.25)[0].prefill_lse and build_policy("h2o+kivi", 0.25)[0].prefill_lse
    assert not build_policy("snapkv", 0.25)[0].prefill_lse and not build_policy("full", None)[0].prefill_lse


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kernel", ["cudnn", "flash"])
def test_fused_attention_returns_the_log_sum_exp_on_cuda(kernel, monkeypatch) -> None:
    """The prompt attention H2O's cache runs on CUDA (`attention_with_lse`, with each of its kernels) equals the
    plain causal attention and its log-sum-exp equals a direct computation. cuDNN's kernel (the first choice) must
    pass on Hopper, where it was measured; elsewhere a cuDNN that cannot run it is skipped."""
    from memfit.core import store
    from memfit.core.store import attention_with_lse, dense_attention

    monkeypatch.setenv("MEMFIT_LSE_KERNELS", kernel)
    monkeypatch.setattr(store, "_LSE_CHECKED", {})
    torch.manual_seed(3)
    q = torch.randn(1, 8, 700, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 2, 700, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, 2, 700, 128, device="cuda", dtype=torch.bfloat16)
    got = attention_with_lse(q, k, v, 128 ** -0.5)
    if got is None and kernel == "cudnn" and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("cuDNN's attention does not run this case on this GPU")
    assert got is not None and store._LSE_CHECKED == {kernel: True} and got.kernel == kernel
    out, lse = got.out, got.lse
    torch.testing.assert_close(out, dense_attention(q, k, v, None, 128 ** -0.5), rtol=2e-2, atol=2e-2)
    logits = (q.float() @ k.float().repeat_interleave(4, 1).transpose(-1, -2)) * 128 ** -0.5
    logits = logits.masked_fill(torch.ones(700, 700, dtype=torch.bool, device="cuda").triu(1), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(logits, -1), rtol=1e-3, atol=1e-2)


def test_the_cache_says_which_kernel_gave_the_prompt_lse(llama) -> None:
    """`prefill_lse_kernel` (in `memfit run --json`): "none" where no fused kernel returned the log-sum-exp (CPU:
    the column sums compute it), None for a method that does not score the prompt's whole attention."""
    from memfit.api import make_cache
    from memfit.engine import pad_left, prefill

    ids, mask = pad_left([list(range(3, 40))])
    for method, want in (("h2o", "none"), ("snapkv", None)):  # the tiny model runs on the CPU
        cache = make_cache(llama, method, 0.5)
        with torch.no_grad():
            prefill(llama, ids, mask, cache)
        assert cache.core.prefill_lse_kernel == want, method
        cache.reset()
        assert cache.core.prefill_lse_kernel is None


def test_an_unknown_lse_kernel_is_a_config_error(monkeypatch) -> None:
    from memfit.core.store import attention_with_lse
    from memfit.errors import ConfigError

    q = torch.zeros(1, 2, 4, 16)
    monkeypatch.setenv("MEMFIT_LSE_KERNELS", "cudnn,nope")
    with pytest.raises(ConfigError, match="MEMFIT_LSE_KERNELS: unknown kernel"):
        attention_with_lse(q, q, q, 0.25)
    monkeypatch.setenv("MEMFIT_LSE_KERNELS", "flash")
    assert attention_with_lse(q, q, q, 0.25) is None  # a CPU tensor: no fused kernel applies
