"""flash_cuda.flash_attn_interface: FlashAttention-2's functions on flash_cuda. Each against
flash_cuda's own API on the equivalent (B, H, N, D) / packed call (the same op: equal outputs and
gradients), FlashAttention's documented bottom-right causal example against the float64
reference, the packed variants' gradients landing in one tensor, return_attn_probs (lse and the
dropout pattern's signs), and every rejected argument."""
import pytest
import torch

import flash_cuda
from flash_cuda import flash_attn_interface as fa
from reference import attention_ref


def bnhd(B, N, H, D, seed, dtype=torch.float32):
    return torch.randn(B, N, H, D, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def grads(out, leaves, seed=9):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, leaves, g)


@pytest.mark.parametrize("kw", [{}, dict(causal=True), dict(window_size=(5, 3), softcap=2.0),
                                dict(causal=True, softmax_scale=0.3, deterministic=True)], ids=str)
def test_flash_attn_func_is_attention_on_views(kw):
    q, k, v = (bnhd(2, n, h, 32, s).requires_grad_() for n, h, s in ((17, 4, 0), (23, 2, 1), (23, 2, 2)))
    out = fa.flash_attn_func(q, k, v, **kw)
    assert out.shape == (2, 17, 4, 32)
    mine = dict(causal=kw.get("causal", False), scale=kw.get("softmax_scale"), softcap=kw.get("softcap", 0.0),
                window=kw.get("window_size"), deterministic=kw.get("deterministic", False))
    ref = flash_cuda.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **mine).transpose(1, 2)
    assert torch.equal(out, ref)
    for a, b in zip(grads(out, (q, k, v)), grads(ref, (q, k, v))):
        assert torch.equal(a, b)


def test_bottom_right_causal_as_documented():
    """FlashAttention's docstring example: seqlen_q = 2, seqlen_k = 5, causal: row 0 sees keys 0..3,
    row 1 all five; seqlen_q = 5, seqlen_k = 2: rows 0..2 see nothing (output 0)."""
    for nq, nk in ((2, 5), (5, 2)):
        q, k, v = bnhd(1, nq, 2, 16, 0), bnhd(1, nk, 2, 16, 1), bnhd(1, nk, 2, 16, 2)
        out = fa.flash_attn_func(q, k, v, causal=True)
        allowed = torch.tensor([[j <= i + nk - nq for j in range(nk)] for i in range(nq)])
        ref, _ = attention_ref(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=allowed)
        assert (out.transpose(1, 2).double() - ref).abs().max() < 1e-6
    assert out[0, :3].abs().max() == 0


def test_alibi_follows_flash_attention():
    """-slope |i + Nk - Nq - j| added to the scores."""
    q, k, v = bnhd(1, 6, 2, 16, 0), bnhd(1, 9, 2, 16, 1), bnhd(1, 9, 2, 16, 2)
    slopes = torch.tensor([0.5, 0.25])
    out = fa.flash_attn_func(q, k, v, alibi_slopes=slopes)
    i, j = torch.arange(6)[:, None], torch.arange(9)[None, :]
    bias = -slopes[:, None, None].double() * (i + 9 - 6 - j).abs()
    ref, _ = attention_ref(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias[None])
    assert (out.transpose(1, 2).double() - ref).abs().max() < 1e-6


def test_packed_variants_and_their_gradients():
    qkv = bnhd(2, 19, 3 * 4, 16, 0).reshape(2, 19, 3, 4, 16).requires_grad_()
    out = fa.flash_attn_qkvpacked_func(qkv, causal=True)
    q, k, v = (qkv[:, :, i].detach().clone().requires_grad_() for i in range(3))
    ref = fa.flash_attn_func(q, k, v, causal=True)
    assert torch.equal(out, ref)
    (dqkv,), dref = grads(out, (qkv,)), grads(ref, (q, k, v))
    assert all(torch.equal(dqkv[:, :, i], dref[i]) for i in range(3))
    qq = bnhd(2, 7, 4, 16, 3).requires_grad_()
    kv = bnhd(2, 11, 2 * 2, 16, 4).reshape(2, 11, 2, 2, 16).requires_grad_()
    out = fa.flash_attn_kvpacked_func(qq, kv)
    ref = fa.flash_attn_func(qq, kv[:, :, 0], kv[:, :, 1])
    assert torch.equal(out, ref) and grads(out, (kv,))[0].shape == kv.shape


def test_varlen_functions():
    lens_q, lens_k = [5, 0, 12], [7, 3, 12]
    cu = lambda lens: torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(sum(lens_q), 4, 16, generator=g)
    k, v = (torch.randn(sum(lens_k), 2, 16, generator=g) for _ in range(2))
    args = (cu(lens_q), cu(lens_k), max(lens_q), max(lens_k))
    out, lse, s = fa.flash_attn_varlen_func(q, k, v, *args, causal=True, window_size=(4, 0), return_attn_probs=True)
    ref, ref_lse = flash_cuda.varlen_attention(q, k, v, *args, causal=True, window=(4, 0), return_lse=True)
    assert torch.equal(out, ref) and torch.equal(lse, ref_lse) and lse.shape == (4, sum(lens_q))
    assert s.shape == (0,)  # no dropout: an empty S_dmask, as FlashAttention 2.7+ (nothing materialised)
    torch.manual_seed(4)
    s = fa.flash_attn_varlen_func(q, k, v, *args, dropout_p=0.25, causal=True, return_attn_probs=True)[2]
    torch.manual_seed(4)
    keep = flash_cuda.varlen_attention(q, k, v, *args, dropout_p=0.25, causal=True, return_dropout_mask=True)[1]
    assert s.shape == (3, 4, 12, 12) and torch.equal(s >= 0, keep) and not bool(keep[1].any())  # (empty sequence)
    kv = torch.stack([k, v], 1)
    assert torch.equal(fa.flash_attn_varlen_kvpacked_func(q, kv, *args, causal=True, window_size=(4, 0)), ref)
    qkv = torch.randn(sum(lens_q), 3, 2, 16, generator=g)
    same = cu(lens_q), max(lens_q)
    assert torch.equal(fa.flash_attn_varlen_qkvpacked_func(qkv, *same),
                       flash_cuda.varlen_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], same[0], same[0], same[1], same[1]))


def test_return_attn_probs_and_dropout():
    """softmax_lse is flash_cuda's lse; S_dmask's signs are the dropout pattern (negative =
    dropped), the same as flash_cuda.attention's mask for the same seed."""
    q, k, v = bnhd(1, 40, 2, 16, 0), bnhd(1, 50, 2, 16, 1), bnhd(1, 50, 2, 16, 2)
    torch.manual_seed(3)
    out, lse, s = fa.flash_attn_func(q, k, v, dropout_p=0.3, causal=True, return_attn_probs=True)
    torch.manual_seed(3)
    ref, ref_lse, keep = flash_cuda.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              dropout_p=0.3, causal=True, return_lse=True, return_dropout_mask=True)
    assert torch.equal(out, ref.transpose(1, 2)) and torch.equal(lse, ref_lse) and lse.shape == (1, 2, 40)
    assert s.shape == (1, 2, 40, 50) and torch.equal(s >= 0, keep) and 0.6 < keep.float().mean() < 0.8


@pytest.mark.parametrize("dropout_p", [0.0, 0])
def test_return_attn_probs_without_dropout_materialises_nothing(dropout_p, monkeypatch):
    """Without dropout S_dmask is an empty tensor of q's dtype and device, as FlashAttention
    2.7+'s (which passes return_softmax only with dropout; it was None here, 2.6's, and
    S_dmask.numel() raised): callers that want softmax_lse (to merge blocks) allocate no
    (B, H, Nq, Nk) tensor (it was all +1 float32 here: 128 GiB at 32k tokens and 32 heads). The
    lse is the call's. The varlen functions the same."""
    q, k, v = bnhd(1, 40, 2, 16, 0, torch.bfloat16), bnhd(1, 50, 2, 16, 1, torch.bfloat16), \
        bnhd(1, 50, 2, 16, 2, torch.bfloat16)
    made = []
    monkeypatch.setattr(flash_cuda.api, "_dropout_mask", lambda *a, **kw: made.append(a))
    out, lse, s = fa.flash_attn_func(q, k, v, dropout_p=dropout_p, causal=True, return_attn_probs=True)
    ref, ref_lse = flash_cuda.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True,
                                        return_lse=True)
    assert s.shape == (0,) and s.dtype == torch.bfloat16 and s.device == q.device and s.numel() == 0
    assert not made and torch.equal(out, ref.transpose(1, 2)) and torch.equal(lse, ref_lse)
    cu_q, cu_k = torch.tensor([0, 40], dtype=torch.int32), torch.tensor([0, 50], dtype=torch.int32)
    out, lse, s = fa.flash_attn_varlen_func(q[0], k[0], v[0], cu_q, cu_k, 40, 50, dropout_p, causal=True,
                                            return_attn_probs=True)
    assert s.shape == (0,) and s.dtype == torch.bfloat16 and not made and torch.equal(out, ref.transpose(1, 2)[0])
    with pytest.raises(TypeError, match=r"dropout_p must be a float"):
        fa.flash_attn_func(q, k, v, dropout_p="0", return_attn_probs=True)


def test_rejected_arguments():
    q, k, v = bnhd(1, 8, 2, 16, 0), bnhd(1, 8, 2, 16, 1), bnhd(1, 8, 2, 16, 2)
    with pytest.raises(ValueError, match=r"flash_attn_func: q must be 4-D \(batch, seqlen_q, nheads, headdim\)"):
        fa.flash_attn_func(q[0], k, v)
    with pytest.raises(ValueError, match=r"flash_attn_func: v must be \(batch, seqlen_k, nheads_k, headdim\)"):
        fa.flash_attn_func(q, k, v[:, :5])
    with pytest.raises(TypeError, match=r"window_size must be a pair of ints"):
        fa.flash_attn_func(q, k, v, window_size=4)
    with pytest.raises(TypeError, match="flash_attn_func: causal must be a bool, got str"):
        fa.flash_attn_func(q, k, v, causal="yes")
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
        fa.flash_attn_func(q, k, v, dropout_p=1.0)
    with pytest.raises(ValueError, match=r"qkv must be \(batch, seqlen, 3, nheads, headdim\)"):
        fa.flash_attn_qkvpacked_func(torch.zeros(1, 8, 2, 2, 16))
    with pytest.raises(ValueError, match=r"kv must be \(batch, seqlen_k, 2, nheads_k, headdim\)"):
        fa.flash_attn_kvpacked_func(q, torch.zeros(1, 8, 3, 2, 16))
    cu = torch.tensor([0, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"flash_attn_varlen_func: q must be 3-D"):
        fa.flash_attn_varlen_func(q, k[0], v[0], cu, cu, 8, 8)


def test_errors_name_the_callers_arguments():
    """flash_cuda's checks named its own function and arguments (flash_cuda.varlen_attention:
    scale, cu_seqlens_q, max_seqlen_q, k), which the caller of the drop-in never passed."""
    q, k, v = bnhd(1, 8, 2, 16, 0), bnhd(1, 8, 2, 16, 1), bnhd(1, 8, 2, 16, 2)
    with pytest.raises(ValueError, match=r"^flash_attn_func: softmax_scale must be finite"):
        fa.flash_attn_func(q, k, v, softmax_scale=float("inf"))
    cu = torch.tensor([0, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"^flash_attn_varlen_func: softmax_scale must be finite"):
        fa.flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, 8, 8, softmax_scale=float("nan"))
    qkv = torch.stack([q[0], k[0], v[0]], 1)
    with pytest.raises(TypeError, match=r"^flash_attn_varlen_qkvpacked_func: cu_seqlens must be int32"):
        fa.flash_attn_varlen_qkvpacked_func(qkv, cu.long(), 8)
    with pytest.raises(TypeError, match=r"^flash_attn_varlen_qkvpacked_func: max_seqlen must be a non-negative int"):
        fa.flash_attn_varlen_qkvpacked_func(qkv, cu, 8.0)
    with pytest.raises(ValueError, match=r"^flash_attn_varlen_kvpacked_func: kv must have the head dim of q"):
        fa.flash_attn_varlen_kvpacked_func(q[0], torch.zeros(8, 2, 2, 8), cu, cu, 8, 8)
    with pytest.raises(ValueError, match=r"^flash_attn_varlen_qkvpacked_func: max_seqlen 4 is smaller than the longest "
                                         r"sequence \(8\) of cu_seqlens$"):
        fa.flash_attn_varlen_qkvpacked_func(qkv, cu, 4)
    wide = torch.zeros(1, 8, 3, 2, 300)
    with pytest.raises(ValueError, match=r"^flash_attn_qkvpacked_func: head dim D \(last dim of qkv\) must be in"):
        fa.flash_attn_qkvpacked_func(wide)
    with pytest.raises(ValueError, match=r"^flash_attn_varlen_qkvpacked_func: head dim D \(last dim of qkv\) must be"):
        fa.flash_attn_varlen_qkvpacked_func(wide[0], cu, 8)
    with pytest.raises(ValueError, match=r"^flash_attn_with_kvcache: softmax_scale must be finite"):
        fa.flash_attn_with_kvcache(q, k, v, cache_seqlens=3, softmax_scale=float("inf"))


def test_with_kvcache_shape_errors_in_the_callers_layout():
    """Shape errors describe the caller's (batch, seqlen, nheads, headdim) tensors (they gave the
    transposed views' shapes in flash_cuda's (B, H, N, D) terms: a (2, 64, 2, 32) cache was
    reported as (2, 2, 64, 32))."""
    q, kc = torch.randn(3, 1, 4, 32), torch.randn(2, 64, 2, 32)
    with pytest.raises(ValueError, match=r"k_cache must be \(batch, seqlen_cache, nheads_k, headdim\) with the batch "
                                         r"of q \(3\), got \(2, 64, 2, 32\)"):
        fa.flash_attn_with_kvcache(q, kc, kc, cache_seqlens=3)
    with pytest.raises(ValueError, match=r"v_cache must have the shape of k_cache \(2, 64, 2, 32\), got \(2, 32, 2, 32\)"):
        fa.flash_attn_with_kvcache(q[:2], kc, kc[:, :32], cache_seqlens=3)
    with pytest.raises(ValueError, match=r"nheads of q \(1, q is \(batch, seqlen_q, nheads, headdim\)\) must be"):
        fa.flash_attn_with_kvcache(q[:2].transpose(1, 2).contiguous(), kc, kc, cache_seqlens=3)
    with pytest.raises(ValueError, match=r"k must be \(batch, seqlen_new, nheads_k, headdim\) = \(2, seqlen_new, 2, "
                                         r"32\), got \(2, 1, 4, 32\)"):
        fa.flash_attn_with_kvcache(q[:2], kc, kc, torch.randn(2, 1, 4, 32), torch.randn(2, 1, 4, 32), cache_seqlens=3)


def test_with_kvcache_bnhd_paged():
    """flash_attn_with_kvcache on FlashAttention's (B, N, H, D) layouts, a paged pool included:
    the append lands in the caller's memory and the output matches attention on the valid keys."""
    g = torch.Generator().manual_seed(3)
    B, N, H, Hkv, D, ps = 2, 40, 4, 2, 16, 16
    pool_k, pool_v = (torch.randn(6, ps, Hkv, D, generator=g) for _ in range(2))
    table = torch.tensor([[4, 0, 2], [1, 5, 3]], dtype=torch.int32)
    q = torch.randn(B, 1, H, D, generator=g)
    k, v = (torch.randn(B, 1, Hkv, D, generator=g) for _ in range(2))
    seqlens = torch.tensor([17, 30], dtype=torch.int32)
    out, lse = fa.flash_attn_with_kvcache(q, pool_k, pool_v, k, v, cache_seqlens=seqlens, block_table=table,
                                          causal=True, return_softmax_lse=True)
    assert out.shape == (B, 1, H, D) and lse.shape == (B, H, 1)
    for b in range(B):
        n = seqlens[b].item() + 1
        keys = pool_k[table[b].long()].reshape(-1, Hkv, D)[:n]
        vals = pool_v[table[b].long()].reshape(-1, Hkv, D)[:n]
        assert torch.equal(keys[-1], k[b, 0]) and torch.equal(vals[-1], v[b, 0])
        ref, _ = attention_ref(q[b:b + 1].transpose(1, 2), keys.transpose(0, 1)[None], vals.transpose(0, 1)[None])
        torch.testing.assert_close(out[b:b + 1].transpose(1, 2), ref.float(), rtol=1e-5, atol=1e-6)


def test_max_seqlen_as_a_0d_tensor():
    """FlashAttention's max_seqlen ints take 0-d integer tensors (torch's int arguments do; older
    transformers passed position_ids.max() + 1): the same call as with the int. Float and bool
    tensors stay refused, naming the argument."""
    lens = [5, 3]
    cu = torch.tensor([0, 5, 8], dtype=torch.int32)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(8, 2, 16, generator=g) for _ in range(3))
    want = fa.flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), causal=True)
    m = torch.tensor(lens).max()
    assert torch.equal(fa.flash_attn_varlen_func(q, k, v, cu, cu, m, m, causal=True), want)
    qkv = torch.stack([q, k, v], 1)
    assert torch.equal(fa.flash_attn_varlen_qkvpacked_func(qkv, cu, m.to(torch.int32), causal=True), want)
    assert torch.equal(flash_cuda.varlen_attention(q, k, v, cu, cu, m, m, causal=True), want)
    for bad in (torch.tensor(5.0), torch.tensor(True), torch.tensor([5])):
        with pytest.raises(TypeError, match="max_seqlen_q must be a non-negative int"):
            fa.flash_attn_varlen_func(q, k, v, cu, cu, bad, 5)


def test_with_kvcache_output_is_contiguous():
    """Several queries (chunked prefill, speculative decoding): the output is a contiguous
    (batch, seqlen_q, nheads, headdim) tensor, as FlashAttention's, so out.view(B, Nq, H * D)
    works (it was a transposed view of (B, H, Nq, D) memory)."""
    g = torch.Generator().manual_seed(6)
    kc, vc = (torch.randn(2, 32, 2, 16, generator=g) for _ in range(2))
    q = torch.randn(2, 3, 4, 16, generator=g)
    k, v = (torch.randn(2, 3, 2, 16, generator=g) for _ in range(2))
    out = fa.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=torch.tensor([4, 9], dtype=torch.int32),
                                     causal=True)
    assert out.shape == (2, 3, 4, 16) and out.is_contiguous()
    assert out.view(2, 3, 64).shape == (2, 3, 64)


def test_output_layout_is_flash_attentions():
    """FlashAttention's forward allocates out as torch.empty_like(q) (its fake too): q's memory
    layout, contiguous (B, Nq, H, D) for a contiguous or packed q, (B, H, Nq, D) memory for a
    transposed one (a 2026-12-07 change that made it contiguous was reverted: callers of
    flash-attn that transpose back and view rely on q's layout). Values and gradients the same
    in every layout."""
    B, N, H, D = 2, 13, 4, 16
    g = torch.Generator().manual_seed(4)
    bnhd_q = torch.randn(B, N, H, D, generator=g)
    layouts = {"contiguous": bnhd_q, "transposed": bnhd_q.transpose(1, 2).contiguous().transpose(1, 2)}
    k, v = (torch.randn(B, N, 2, D, generator=g) for _ in range(2))
    for name, q in layouts.items():
        q = q.clone().requires_grad_() if q.is_contiguous() else q.transpose(1, 2).clone().requires_grad_()
        q_in = q if name == "contiguous" else q.transpose(1, 2)
        out = fa.flash_attn_func(q_in, k, v, causal=True)
        assert out.stride() == torch.empty_like(q_in).stride(), (name, out.stride())
        plain = q_in.detach().contiguous().requires_grad_()
        mine = fa.flash_attn_func(plain, k, v, causal=True)
        assert torch.equal(out, mine)
        assert torch.equal(grads(out, (q_in,))[0], grads(mine, (plain,))[0])
    qkv = torch.randn(B, 3, H, N, D, generator=g).permute(0, 3, 1, 2, 4)  # (B, N, 3, H, D) of (B, 3, H, N, D)
    for buf in (qkv, qkv.contiguous()):
        out = fa.flash_attn_qkvpacked_func(buf, causal=True)
        assert out.stride() == torch.empty_like(buf[:, :, 0]).stride()
        assert torch.equal(out, fa.flash_attn_qkvpacked_func(qkv.contiguous(), causal=True))


def test_negative_softcap_is_off_as_in_flash_attention():
    """FlashAttention: "softcap: anything > 0 activates softcapping" (its bindings test softcap > 0),
    so a negative one runs without it; it was refused here. Every function, as Python and numpy
    numbers, bit for bit the softcap=0 call; NaN and inf stay refused, naming softcap."""
    import numpy as np
    q, k, v = bnhd(2, 9, 4, 16, 0), bnhd(2, 11, 2, 16, 1), bnhd(2, 11, 2, 16, 2)
    cu = torch.tensor([0, 9, 18], dtype=torch.int32)
    cu_k = torch.tensor([0, 11, 22], dtype=torch.int32)
    calls = [lambda c: fa.flash_attn_func(q, k, v, 0.0, None, True, (-1, -1), c),
             lambda c: fa.flash_attn_kvpacked_func(q, torch.stack((k, v), 2), softcap=c),
             lambda c: fa.flash_attn_qkvpacked_func(torch.stack((q, q, q), 2), softcap=c),
             lambda c: fa.flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu_k, 9, 11,
                                                 softcap=c, causal=True),
             lambda c: fa.flash_attn_with_kvcache(q, k.clone(), v.clone(), cache_seqlens=7, softcap=c)]
    for call in calls:
        off = call(0.0)
        for c in (-1.0, -3, np.float32(-0.5), -0.0):
            assert torch.equal(call(c), off), c
        assert not torch.equal(call(1.0), off)
        for bad in (float("nan"), float("inf")):
            with pytest.raises(ValueError, match=r"flash_attn_\w+: softcap must be finite"):
                call(bad)


def test_arguments_as_flash_attention_takes_them():
    """What FlashAttention-2's bindings accept runs unchanged: flags as numpy bools or ints
    (return_attn_probs by its truth), any negative window entry as unbounded, softmax_scale as a
    0-d tensor, alibi_slopes that require grad (read as constants, no gradient: FlashAttention
    returns none), and flash_attn_with_kvcache on tensors that require grad (it has no autograd)."""
    import numpy as np
    q, k, v = (bnhd(2, 9, 4, 16, s).requires_grad_() for s in range(3))
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625], requires_grad=True)
    out, lse, _ = fa.flash_attn_func(q, k, v, softmax_scale=torch.tensor(0.3), causal=np.bool_(True),
                                     window_size=(-7, 2), alibi_slopes=slopes, deterministic=1, return_attn_probs=1)
    bhnd = [x.detach().double().transpose(1, 2) for x in (q, k, v)]
    ref = attention_ref(*bhnd, causal=True, scale=0.3, window=(-1, 2), alibi_slopes=slopes.detach().double())[0]
    assert (out.double() - ref.transpose(1, 2)).abs().max() < 1e-5 and lse.shape == (2, 4, 9)
    mine = flash_cuda.attention(*(x.transpose(1, 2) for x in (q, k, v)), causal=True, scale=0.3,
                                alibi_slopes=slopes.detach()).transpose(1, 2)
    assert torch.equal(out, mine)
    out.sum().backward()
    assert slopes.grad is None and q.grad is not None
    assert torch.equal(fa.flash_attn_func(q, k, v, window_size=(-2, -5)), fa.flash_attn_func(q, k, v))

    k_cache, v_cache = (torch.zeros(2, 12, 4, 16, requires_grad=True) for _ in range(2))
    k_new, v_new = (bnhd(2, 9, 4, 16, s).requires_grad_() for s in (5, 6))
    out, lse = fa.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=0, causal=True,
                                         return_softmax_lse=np.bool_(True))
    assert not out.requires_grad and torch.equal(k_cache[:, :9], k_new.detach())
    assert torch.equal(out, fa.flash_attn_func(q, k_new, v_new, causal=True).detach())


def test_index_first_axis_residual():
    """FlashAttention's index_first_axis_residual (its BERT's last layer: the rows a head reads and
    the whole tensor for the residual): both results differentiable in input, the gradient the
    residual's plus the rows' scattered back (a row taken twice gets both), checked against the
    same sum by hand and by gradcheck in float64; bad indices named."""
    from flash_cuda import bert_padding as bp
    g = torch.Generator().manual_seed(5)
    x = torch.randn(7, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([5, 1, 1, 6])
    rows, res = bp.index_first_axis_residual(x, idx)
    assert torch.equal(rows, x[idx].detach()) and torch.equal(res, x.detach()) and res.requires_grad
    w_rows, w_res = torch.randn(rows.shape, generator=g, dtype=x.dtype), torch.randn(x.shape, generator=g,
                                                                                     dtype=x.dtype)
    ((rows * w_rows).sum() + (res * w_res).sum()).backward()
    expected = w_res.clone()
    for i, r in enumerate(idx.tolist()):
        expected[r] += w_rows[i]
    assert torch.allclose(x.grad, expected, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda a: bp.index_first_axis_residual(a, idx), (x,))
    assert torch.equal(bp.IndexFirstAxisResidual.apply(x, idx)[0], rows)
    with pytest.raises(ValueError, match=r"index_first_axis_residual: indices must be in \[0, input.shape\[0\]\)"):
        bp.index_first_axis_residual(x, idx + 2)
    with pytest.raises(ValueError, match=r"index_first_axis_residual: input must be a tensor of at least 2 dims"):
        bp.index_first_axis_residual(x[0, 0], idx)


def test_bert_padding_helpers():
    """flash_cuda.bert_padding as FlashAttention's (v2.6+): unpad_input's five values with an
    unused_mask, the concatenated-sequences variant, index_first_axis / index_put_first_axis and
    pad_input, each against loops over the tokens; then varlen attention on what it returns
    equals attention per sequence."""
    from flash_cuda import bert_padding as bp
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 6, 2, 8, generator=g, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0]])
    unused = torch.tensor([[0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    xu, idx, cu, mx, used = bp.unpad_input(x, mask, unused)
    kept = [(b, s) for b in range(3) for s in range(6) if mask[b, s] or unused[b, s]]
    assert idx.tolist() == [b * 6 + s for b, s in kept] and torch.equal(xu, torch.stack([x[b, s] for b, s in kept]))
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 5, 9, 10] and mx == 5 and used.tolist() == [3, 4, 0]
    assert torch.equal(bp.pad_input(xu, idx, 3, 6), x * (mask.bool() | unused)[..., None, None])
    assert torch.equal(bp.index_first_axis(x.reshape(18, 2, 8), idx), xu)
    assert torch.equal(bp.index_put_first_axis(xu, idx, 18).reshape(3, 6, 2, 8), bp.pad_input(xu, idx, 3, 6))
    assert torch.equal(bp.IndexFirstAxis.apply(x.reshape(18, 2, 8), idx), xu)
    assert torch.equal(bp.IndexPutFirstAxis.apply(xu, idx, 18), bp.index_put_first_axis(xu, idx, 18))
    r = bp.unpad_input(x, mask)
    assert len(r) == 5 and r[0].shape[0] == 7 and r[2].tolist() == [0, 3, 7, 7] and r[4].tolist() == [3, 4, 0]
    (bp.pad_input(xu, idx, 3, 6) * 2).sum().backward()
    assert torch.equal(x.grad, 2 * (mask.bool() | unused)[..., None, None].expand_as(x).float())

    in_length = torch.tensor([[2, 3, 0, 0, 0, 0], [6, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]])
    xu, idx, cu, mx = bp.unpad_input_for_concatenated_sequences(x, in_length)
    assert idx.tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 12, 13, 14] and mx == 6
    assert cu.tolist() == [0, 2, 5, 11, 12, 13, 14]
    q = xu.detach()
    out = flash_cuda.varlen_attention(q, q, q, cu, cu, mx, mx, causal=True)
    c = cu.tolist()
    for a, b in zip(c, c[1:]):
        seq = q[a:b].transpose(0, 1)[None].double()
        ref = attention_ref(seq, seq, seq, causal=True)[0][0].transpose(0, 1)
        assert (out[a:b].double() - ref).abs().max() < 1e-5

    for call, exc, match in [
            (lambda: bp.unpad_input(x, mask, unused[:2]), ValueError, "unused_mask must be \\(B, S\\)"),
            (lambda: bp.unpad_input(x, mask * -1e9), ValueError, "attention_mask must be a padding mask"),
            (lambda: bp.unpad_input(x[0, 0], mask), ValueError, "attention_mask must be \\(B, S\\) matching "
                                                                "hidden_states"),
            (lambda: bp.index_first_axis(x.reshape(18, 2, 8), idx + 5), ValueError, "indices must be in \\[0, input.shape\\[0\\]\\) = \\[0, 18\\)"),
            (lambda: bp.index_first_axis(x.reshape(18, 2, 8), idx.int()), TypeError, "indices must be a 1-D int64"),
            (lambda: bp.index_put_first_axis(xu, idx, -1), ValueError, "first_axis_dim must be a non-negative int"),
            (lambda: bp.index_put_first_axis(xu, idx[:3], 18), ValueError, "indices must have one entry per row of values"),
            (lambda: bp.index_put_first_axis(xu, idx.flip(0).clamp(max=idx[1]), 18), ValueError,
             "indices must be distinct"),
            (lambda: bp.pad_input(xu, idx, 2, 6), ValueError, "indices must be in \\[0, batch \\* seqlen\\)"),
            (lambda: bp.unpad_input_for_concatenated_sequences(x, in_length * 2), ValueError, "attention_mask_in_length must hold .* sum per row"),
            (lambda: bp.unpad_input_for_concatenated_sequences(x, in_length.float()), TypeError, "attention_mask_in_length must be an integer tensor")]:
        with pytest.raises(exc, match=r"flash_cuda.bert_padding.\w+: " + match):
            call()
    # compiled on the CPU the index checks run in the graph (Inductor's own bounds check failed
    # there too, without naming indices)
    for f, args, match in [(bp.index_first_axis, (x.reshape(18, 2, 8), idx + 5),
                            r"indices must be in \[0, input.shape\[0\]\)"),
                           (bp.pad_input, (xu, idx, 2, 6), r"indices must be in \[0, batch \* seqlen\)")]:
        torch._dynamo.reset()
        with pytest.raises(RuntimeError, match=r"flash_cuda.bert_padding.\w+: " + match):
            torch.compile(f, fullgraph=True)(*args)
