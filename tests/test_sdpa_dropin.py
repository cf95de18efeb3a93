"""flash_cuda.scaled_dot_product_attention reproduces torch.nn.functional.scaled_dot_product_attention
(math backend) for every argument combination it supports: shapes with 2 to 5 dims, top-left
causal alignment with Nq != Nk, custom scale, enable_gqa and the one-kv-head broadcast."""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import flash_cuda
from reference import assert_close_fp, max_err

CASES = [  # (query shape, key/value shape, enable_gqa)
    ((2, 4, 33, 16), (2, 4, 33, 16), False),
    ((2, 4, 33, 16), (2, 4, 57, 16), False),
    ((2, 4, 57, 16), (2, 4, 33, 16), False),
    ((2, 6, 40, 32), (2, 2, 50, 32), True),
    ((2, 6, 40, 32), (2, 1, 50, 32), False),  # one kv head broadcasts, as in torch
    ((4, 30, 24), (4, 30, 24), False),        # 3-D: dim -3 is the head dim
    ((6, 30, 24), (2, 35, 24), True),
    ((30, 24), (35, 24), False),              # 2-D
    ((2, 3, 2, 20, 8), (2, 3, 2, 25, 8), False),  # 5-D: leading dims are batch
]


def run_both(qs, ks, dtype, **kw):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(s, generator=g).to(dtype) for s in (qs, ks, ks))
    dout = torch.randn(qs, generator=g).to(dtype)
    results = []
    for fn in (flash_cuda.scaled_dot_product_attention, F.scaled_dot_product_attention):
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        with sdpa_kernel(SDPBackend.MATH):
            out = fn(*leaves, **kw)
        out.backward(dout)
        results.append([out] + [x.grad for x in leaves])
    return results


@pytest.mark.parametrize("qs,ks,gqa", CASES)
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_matches_torch_sdpa_fp32(qs, ks, gqa, is_causal, scale):
    ours, theirs = run_both(qs, ks, torch.float32, is_causal=is_causal, scale=scale, enable_gqa=gqa)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, theirs):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert_close_fp(name, a, b, rtol=5e-5)


@pytest.mark.parametrize("qs,ks,gqa", CASES[:5])
def test_matches_torch_sdpa_bf16(qs, ks, gqa):
    """bf16 against torch's bf16 math backend, both measured against float64."""
    ours, theirs = run_both(qs, ks, torch.bfloat16, is_causal=True, enable_gqa=gqa)
    ref, _ = run_both(qs, ks, torch.float64, is_causal=True, enable_gqa=gqa)
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        factor = 2 if name == "out" else 3
        assert max_err(ours[i], ref[i]) <= factor * max_err(theirs[i], ref[i]) + 1e-5, name


def test_empty_key_sequence_matches_torch():
    ours, theirs = run_both((1, 2, 5, 8), (1, 2, 0, 8), torch.float32)
    assert torch.equal(ours[0], theirs[0])  # both all zeros
