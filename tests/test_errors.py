"""Bad input raises a Python exception naming the argument and what is expected (one test
per case), and empty sequences give their documented result: no NaN, no crash."""
import math
import re

import pytest
import torch

import flash_cuda
from conftest import widest_dtype
from reference import attention_ref

attention = flash_cuda.attention
sdpa = flash_cuda.scaled_dot_product_attention


def qkv(Hq=4, Hkv=2, Nq=8, Nk=8, D=16, B=2, dtype=torch.float32, device="cpu"):
    return (torch.randn(B, Hq, Nq, D, dtype=dtype, device=device),
            torch.randn(B, Hkv, Nk, D, dtype=dtype, device=device),
            torch.randn(B, Hkv, Nk, D, dtype=dtype, device=device))


def test_not_a_tensor():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"k must be a torch.Tensor, got list"):
        attention(q, [1.0], v)


def test_wrong_ndim():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"q must be 4-D \(B, Hq, Nq, D\), got shape \(4, 8, 16\)"):
        attention(q[0], k, v)


def test_mismatched_batch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"k must have the batch size of q \(2\)"):
        attention(q, k[:1], v[:1])


def test_mismatched_head_dim():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"k must have the head dim of q \(16\)"):
        attention(q, k[..., :8], v[..., :8])


def test_mismatched_kv_lengths():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"v must have the shape of k \(2, 2, 8, 16\)"):
        attention(q, k, v[:, :, :5])


def test_heads_not_divisible():
    q, k, v = qkv(Hq=6, Hkv=4)
    with pytest.raises(ValueError, match=r"query heads \(6\) must be a multiple of the number of key/value heads \(4\)"):
        attention(q, k, v)
    q, k, v = qkv(Hq=2, Hkv=0)
    with pytest.raises(ValueError, match=r"query heads \(2\) must be a multiple of the number of key/value heads \(0\), at least 1"):
        attention(q, k, v)


def test_zero_query_heads_give_an_empty_output():
    """As torch SDPA: no query heads (a multiple of any kv head count) is an empty problem, not an error;
    the KV cache still takes the appended keys."""
    q, k, v = qkv(Hq=0, Hkv=2)
    assert attention(q, k, v).shape == q.shape
    cache = torch.zeros(2, 2, 8, 16)
    new = torch.randn(2, 2, 1, 16)
    out = flash_cuda.attention_with_kvcache(q[:, :, :1], cache, cache.clone(), new, new,
                                            cache_seqlens=torch.tensor([0, 3], dtype=torch.int32))
    assert out.shape == (2, 0, 1, 16)
    assert torch.equal(cache[0, :, 0], new[0, :, 0]) and torch.equal(cache[1, :, 3], new[1, :, 0])


def test_mismatched_dtypes():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"v must have the dtype of q \(torch.float32\), got torch.float16"):
        attention(q, k, v.half())


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.complex64])
def test_unsupported_dtype(dtype):
    q, k, v = (x.to(dtype) for x in qkv())
    with pytest.raises(TypeError, match=r"q must have dtype float16, bfloat16, float32 or float64"):
        attention(q, k, v)


def test_different_devices():
    q, k, v = qkv()
    with pytest.raises(RuntimeError, match=r"k must be on the device of q \(cpu\), got meta"):
        attention(q, k.to("meta"), v)


@pytest.mark.parametrize("D", [0, 257, 512])
def test_head_dim_out_of_range(D):
    q, k, v = qkv(D=D)
    with pytest.raises(ValueError, match=rf"head dim D \(last dim of q\) must be in \[1, 256\], got {D}"):
        attention(q, k, v)


@pytest.mark.parametrize("scale,exc,msg", [
    ("0.1", TypeError, "scale must be a float or None, got str"),
    (True, TypeError, "scale must be a float or None, got bool"),
    (math.inf, ValueError, "scale must be finite, got inf"),
    (math.nan, ValueError, "scale must be finite, got nan"),
])
def test_bad_scale(scale, exc, msg):
    with pytest.raises(exc, match=msg):
        attention(*qkv(), scale=scale)


def test_causal_not_bool():
    with pytest.raises(TypeError, match=r"causal must be a bool, got int"):
        attention(*qkv(), causal=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_kernels_take_16_bit_or_fp32():
    if not flash_cuda.has_cuda_kernels():
        with pytest.raises(RuntimeError, match=r"has no CUDA kernels"):
            attention(*qkv(device="cuda"))
    else:
        with pytest.raises(TypeError, match=r"the CUDA kernels take float16, bfloat16 or float32 on CUDA"):
            attention(*qkv(dtype=torch.float64, device="cuda"))


def test_emulated_kernels_take_16_bit_or_fp32():
    with flash_cuda.emulate():
        with pytest.raises(TypeError, match=r"the CUDA kernels take float16, bfloat16 or float32 inside "
                                            r"flash_cuda\.emulate\(\)"):
            attention(*qkv(dtype=torch.float64))
        with pytest.raises(TypeError, match=r"flash_cuda.attention_with_kvcache: q has dtype torch.float32; the CUDA "
                                            r"kernels take float16 or bfloat16 inside"):
            flash_cuda.attention_with_kvcache(*qkv(dtype=torch.float32))


def test_emulated_kernels_check_in_cpp_too():
    """A direct op call bypasses the Python checks; the launcher refuses float64 itself, and
    float32 where it has no kernel (the KV cache)."""
    q, k, v = qkv(dtype=torch.float64)
    with flash_cuda.emulate():
        with pytest.raises(RuntimeError, match=r"the CUDA kernels \(emulated\) take float16 or bfloat16 inputs "
                                               r"\(or float32\), got Double"):
            torch.ops.flash_cuda.fwd(q, k, v, 0.125, False, True)
        q, k, v = qkv(dtype=torch.float32)
        with pytest.raises(RuntimeError, match=r"the CUDA kernels \(emulated\) take float16 or bfloat16 inputs, got Float"):
            torch.ops.flash_cuda.kvcache_fwd(q, k, v, None, None, torch.zeros(2, dtype=torch.int32), None, 0.25,
                                             False)


# The drop-in's unsupported arguments.

def test_sdpa_attn_mask_not_broadcastable():
    q, k, v = qkv(Hkv=4)
    with pytest.raises(ValueError, match=r"attn_mask of shape \(3, 8\) is not broadcastable to \(2, 4, 8, 8\)"):
        sdpa(q, k, v, attn_mask=torch.ones(3, 8, dtype=torch.bool))


def test_sdpa_value_head_dim_unsupported():
    q, k, v = qkv(Hkv=4)
    with pytest.raises(NotImplementedError, match=r"value must have the head dim of query \(16\)"):
        sdpa(q, k, torch.randn(2, 4, 8, 32))


def test_sdpa_batch_dims_that_do_not_broadcast():
    """Leading dims broadcast as torch's (tests/test_sdpa_dropin.py); where they cannot, the error
    names the three shapes' batch dims (torch's names none)."""
    q, k, v = qkv(Hkv=4)
    k3, v3 = (torch.cat([x, x[:1]]) for x in (k, v))
    with pytest.raises(ValueError, match=r"the batch dims of query \(2,\), key \(3,\) and value \(3,\) "
                                         r"\(before the head dim, -3\) do not broadcast"):
        sdpa(q, k3, v3)


def test_sdpa_heads_without_enable_gqa():
    with pytest.raises(ValueError, match=r"pass enable_gqa=True for grouped-query attention"):
        sdpa(*qkv(Hq=4, Hkv=2))


def test_sdpa_gqa_not_divisible():
    with pytest.raises(ValueError, match=r"with enable_gqa the number of key heads \(4\) must divide the number "
                                         r"of query heads \(6\)"):
        sdpa(*qkv(Hq=6, Hkv=4), enable_gqa=True)


def test_sdpa_bad_ndim():
    q, k, v = qkv(Hkv=4)
    with pytest.raises(ValueError, match=r"query must have at least 2 dims \(..., L, E\)"):
        sdpa(q[0, 0, 0], k, v)


# Empty sequences: documented results, no NaN.

@pytest.mark.parametrize("causal", [False, True])
def test_empty_query_sequence(device, causal):
    q, k, v = (x.requires_grad_() for x in qkv(Nq=0, device=device, dtype=widest_dtype(device)))
    out, lse = attention(q, k, v, causal=causal, return_lse=True)
    assert out.shape == (2, 4, 0, 16) and lse.shape == (2, 4, 0)
    out.sum().backward()
    assert torch.equal(k.grad, torch.zeros_like(k)) and torch.equal(v.grad, torch.zeros_like(v))


@pytest.mark.parametrize("Nq", [8, 16])  # on the CPU: the KV-cache loop, the tiled loop
@pytest.mark.parametrize("causal", [False, True])
def test_empty_key_sequence(device, causal, Nq):
    """Nk = 0: every row sees no key, so out = 0, lse = -inf and dq = 0."""
    q, k, v = (x.requires_grad_() for x in qkv(Nq=Nq, Nk=0, device=device, dtype=widest_dtype(device)))
    out, lse = attention(q, k, v, causal=causal, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    out.sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q)) and k.grad.shape == k.shape


def test_empty_batch(device):
    q, k, v = qkv(B=0, device=device, dtype=widest_dtype(device))
    assert attention(q, k, v).shape == (0, 4, 8, 16)


def test_deterministic_not_bool():
    with pytest.raises(TypeError, match=r"deterministic must be a bool"):
        attention(*qkv(), deterministic="yes")


# Masks and score modifiers (flash_cuda.attention's window, softcap, alibi_slopes, attn_mask).

@pytest.mark.parametrize("window", [5, (1, 2, 3), (1.0, 2), ("a", 1), (True, 1)])
def test_window_not_a_pair_of_ints(window):
    with pytest.raises(TypeError, match=r"window must be a pair of ints \(left, right\) or None"):
        attention(*qkv(), window=window)


@pytest.mark.parametrize("window", [(-2, 0), (3, -5)])
def test_window_entries_below_minus_one(window):
    with pytest.raises(ValueError, match=r"window entries must be in \[-1, 2\*\*63 - 1\] \(-1 = unbounded on that side\)"):
        attention(*qkv(), window=window)


def test_window_entries_past_int64():
    """The ops take int64: a larger Python int is refused here, not by the dispatcher's cast."""
    with pytest.raises(ValueError, match=r"window entries must be in \[-1, 2\*\*63 - 1\]"):
        attention(*qkv(), window=(2**63, 0))
    q, k, v = (x[0].transpose(0, 1).contiguous() for x in qkv(B=1))
    cu = torch.tensor([0, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"flash_cuda.varlen_attention: window entries must be in"):
        flash_cuda.varlen_attention(q, k, v, cu, cu, 8, 8, window=(0, 2**64))


@pytest.mark.parametrize("window", [(0, 2**63 - 1), (2**63 - 1, 0), (2**31, 2**40)])
def test_window_bounds_past_every_key(window):
    """A bound past every key offset hides nothing, as -1 does: near 2**63 the band's int64
    arithmetic overflowed and hid every key (out 0, lse -inf), silently."""
    for nq, nk in ((9, 11), (11, 9), (300, 560), (560, 300)):
        q, k, v = qkv(Nq=nq, Nk=nk)
        unbounded = tuple(-1 if w >= 2**31 else w for w in window)
        out, lse = attention(q, k, v, window=window, return_lse=True)
        ref, ref_lse = attention(q, k, v, window=unbounded, return_lse=True)
        assert torch.equal(out, ref) and torch.equal(lse, ref_lse)
    q, k, v = (x[0].transpose(0, 1).contiguous() for x in qkv(B=1, Nq=9, Nk=9))
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    assert torch.equal(flash_cuda.varlen_attention(q, k, v, cu, cu, 5, 5, window=window),
                       flash_cuda.varlen_attention(q, k, v, cu, cu, 5, 5, window=unbounded))
    q, k, v = qkv(Nq=1, Nk=16)
    assert torch.equal(flash_cuda.attention_with_kvcache(q, k, v, cache_seqlens=10, window=window),
                       flash_cuda.attention_with_kvcache(q, k, v, cache_seqlens=10, window=unbounded))


def test_scale_outside_float32():
    """fp32/fp16/bf16 inputs take the scale in float32: one that overflows it is refused (it made
    every output NaN); float64 inputs take any finite scale."""
    with pytest.raises(ValueError, match=r"scale must be finite in float32 .* for torch.float32 inputs, got 1e\+39"):
        attention(*qkv(), scale=1e39)
    with pytest.raises(ValueError, match=r"scale must be finite in float32"):
        sdpa(*qkv(Hkv=4), scale=-1e39)
    q, k, v = qkv(dtype=torch.float64)
    assert torch.isfinite(attention(q * 1e-37, k, v, scale=1e39)).all()


def test_scale_and_softcap_below_float32s_normal_range():
    """fp16/bf16/fp32 inputs take scale and softcap in float32. A nonzero scale below its normal
    range is its limit 0 (uniform rows; the CUDA kernels, flushing denormals, saw 0 where they need
    a positive scale and gave NaN, in the emulator); a softcap past float32's range or below its
    normal range is refused (it made every output NaN, or was silently off). float64 inputs keep
    both as given."""
    q, k, v = qkv(dtype=torch.float16, Nq=5, Nk=7)
    uniform = v.double().mean(2, keepdim=True).repeat_interleave(2, 1).expand(q.shape)
    with flash_cuda.emulate():
        for scale in (5e-324, -1e-40, 1e-39):
            out = attention(q, k, v, scale=scale)
            assert (out.double() - uniform).abs().max() < 2e-3, scale
    assert torch.equal(attention(*(x.float() for x in (q, k, v)), scale=5e-324),
                       attention(*(x.float() for x in (q, k, v)), scale=0.0))
    for softcap in (1e39, 5e-324, 1e-39):
        with pytest.raises(ValueError, match=r"softcap must be 0 \(off\) or in float32's normal range .* for "
                                             r"torch.float32 inputs"):
            attention(*qkv(), softcap=softcap)
    q, k, v = qkv(dtype=torch.float64, Nq=5, Nk=7)
    ref, _ = attention_ref(q, k, v, softcap=1e-300)
    torch.testing.assert_close(attention(q, k, v, softcap=1e-300), ref)


def test_alibi_slopes_requiring_grad():
    """No gradient flows to the slopes (as in FlashAttention): slopes that require grad would
    silently get none, so they are refused while grad is enabled, and taken under no_grad."""
    slopes = torch.full((4,), 0.5, requires_grad=True)
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"alibi_slopes requires grad, but no gradient flows to it .* "
                                         r"alibi_slopes.detach\(\)"):
        attention(q, k, v, alibi_slopes=slopes)
    out = attention(q, k, v, alibi_slopes=slopes.detach())
    with torch.no_grad():
        assert torch.equal(attention(q, k, v, alibi_slopes=slopes), out)


@pytest.mark.parametrize("softcap", [-1.0, math.inf, math.nan])
def test_softcap_negative_or_not_finite(softcap):
    with pytest.raises(ValueError, match=r"softcap must be finite and >= 0 \(0.0 disables it\)"):
        attention(*qkv(), softcap=softcap)


@pytest.mark.parametrize("softcap", ["1", True, None])
def test_softcap_not_a_number(softcap):
    with pytest.raises(TypeError, match=r"softcap must be a float \(0.0 disables it\)"):
        attention(*qkv(), softcap=softcap)


@pytest.mark.parametrize("shape", [(3,), (2, 3), (4, 2), (1, 2, 4)])
def test_alibi_slopes_wrong_shape(shape):
    with pytest.raises(ValueError, match=r"alibi_slopes must have shape \(Hq,\) = \(4,\) or \(B, Hq\) = \(2, 4\)"):
        attention(*qkv(), alibi_slopes=torch.ones(shape))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.int64])
def test_alibi_slopes_wrong_dtype(dtype):
    with pytest.raises(TypeError, match=r"alibi_slopes must be float32, got"):
        attention(*qkv(), alibi_slopes=torch.ones(4, dtype=dtype))


def test_alibi_slopes_wrong_device():
    with pytest.raises(RuntimeError, match=r"alibi_slopes must be on the device of q \(cpu\), got meta"):
        attention(*qkv(), alibi_slopes=torch.ones(4, device="meta"))


def test_alibi_slopes_not_a_tensor():
    with pytest.raises(TypeError, match=r"alibi_slopes must be a torch.Tensor or None, got list"):
        attention(*qkv(), alibi_slopes=[1.0] * 4)


@pytest.mark.parametrize("shape", [(3, 8), (2, 3, 8, 8), (1, 2, 4, 8, 8), (8, 9)])
def test_attn_mask_not_broadcastable(shape):
    with pytest.raises(ValueError, match=r"attn_mask of shape .* is not broadcastable to \(2, 4, 8, 8\)"):
        attention(*qkv(), attn_mask=torch.ones(shape, dtype=torch.bool))


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.int64])
def test_attn_mask_integer_dtype(dtype):
    with pytest.raises(TypeError, match=r"attn_mask must be bool \(True = takes part\) or floating \(added to the "
                                        r"scores\), got torch.(int|uint)"):
        attention(*qkv(), attn_mask=torch.ones(8, 8, dtype=dtype))


def test_attn_mask_other_device():
    with pytest.raises(RuntimeError, match=r"attn_mask must be on the device of the queries \(cpu\), got meta"):
        attention(*qkv(), attn_mask=torch.ones(8, 8, device="meta"))


def test_attn_mask_not_a_tensor():
    with pytest.raises(TypeError, match=r"attn_mask must be a torch.Tensor or None, got list"):
        attention(*qkv(), attn_mask=[[True] * 8] * 8)


def test_ops_check_modifiers_in_cpp_too():
    """A direct torch.ops call with bad modifier arguments gets a clear error, not a crash."""
    q, k, v = qkv()
    fwd = torch.ops.flash_cuda.fwd
    with pytest.raises(RuntimeError, match=r"window bounds must be >= -1"):
        fwd(q, k, v, 0.25, False, True, False, -3, 0)
    with pytest.raises(RuntimeError, match=r"softcap must be finite and >= 0"):
        fwd(q, k, v, 0.25, False, True, False, -1, -1, -2.0)
    with pytest.raises(RuntimeError, match=r"alibi_slopes must be float32 \(1 or B, Hq\)"):
        fwd(q, k, v, 0.25, False, True, False, -1, -1, 0.0, torch.ones(3))
    with pytest.raises(RuntimeError, match=r"bias must be \(B, Hq, Nq, Nk\) = \(2, 4, 8, 8\)"):
        fwd(q, k, v, 0.25, False, True, False, -1, -1, 0.0, None, torch.ones(8, 8))


# pad_input (unpad_input's inverse)

def unpadded():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    return flash_cuda.unpad_input(torch.randn(2, 3, 4), mask)[:2]


@pytest.mark.parametrize("args,exc,match", [
    (lambda xu, idx: ([1, 2], idx, 2, 3), TypeError, r"x_unpad and indices must be torch.Tensors, got list"),
    (lambda xu, idx: (xu, idx.tolist(), 2, 3), TypeError, r"x_unpad and indices must be torch.Tensors"),
    (lambda xu, idx: (xu, idx, 2.0, 3), TypeError, r"batch must be a non-negative int, got 2.0"),
    (lambda xu, idx: (xu, idx, -2, 3), ValueError, r"batch must be a non-negative int, got -2"),
    (lambda xu, idx: (xu, idx, 2, torch.tensor(-3)), ValueError, r"seqlen must be a non-negative int, got -3"),
    (lambda xu, idx: (xu, idx, 2, torch.tensor(3.0)), TypeError, r"seqlen must be a non-negative int, got tensor"),
    (lambda xu, idx: (xu, idx, 2, True), TypeError, r"seqlen must be a non-negative int, got True"),
    (lambda xu, idx: (xu, idx.float(), 2, 3), ValueError, r"indices must be int64 \(total,\) = \(3,\)"),
    (lambda xu, idx: (xu, idx[:2], 2, 3), ValueError, r"indices must be int64 \(total,\) = \(3,\) .* shape \(2,\)"),
    (lambda xu, idx: (xu, idx, 1, 2), ValueError, r"indices must be in \[0, batch \* seqlen\) = \[0, 2\), got values "
                                                  r"in \[0, 3\]"),
    (lambda xu, idx: (xu, idx - 1, 2, 3), ValueError, r"indices must be in \[0, batch \* seqlen\) = \[0, 6\)"),
    (lambda xu, idx: (xu, torch.tensor([0, 0, 3]), 2, 3), ValueError, r"indices must be distinct .*, got 1 repeated"),
    (lambda xu, idx: (xu, torch.tensor([3, 0, 3]), 2, 3), ValueError, r"indices must be distinct .*, got 1 repeated"),
    (lambda xu, idx: (xu, torch.tensor([4, 0, 3]), 2, 3), None, None),  # distinct out of order: written as given
    (lambda xu, idx: (xu[0, 0], idx, 2, 3), ValueError, r"x_unpad must be \(total, ...\), got a 0-d tensor"),
    (lambda xu, idx: (xu, idx.to("meta"), 2, 3), RuntimeError, r"indices must be on the device of x_unpad \(cpu\)"),
])
def test_pad_input_bad_arguments(args, exc, match):
    """(A repeated index kept one of its rows, which torch leaves unspecified: an audit's find.)"""
    xu, idx = unpadded()
    if exc is None:
        out = flash_cuda.pad_input(*args(xu, idx)).reshape(6, -1)
        given = args(xu, idx)[1]
        assert torch.equal(out[given], xu) and not out[[1, 2, 5]].any()
        return
    with pytest.raises(exc, match=r"flash_cuda.pad_input: " + match):
        flash_cuda.pad_input(*args(xu, idx))


def test_pad_input_takes_0d_integer_tensors():
    """Sizes as 0-d integer tensors (lengths.max(), as varlen's max_seqlen takes them)."""
    xu, idx = unpadded()
    assert torch.equal(flash_cuda.pad_input(xu, idx, torch.tensor(2), torch.tensor(3, dtype=torch.int32)),
                       flash_cuda.pad_input(xu, idx, 2, 3))


@pytest.mark.parametrize("mask,exc,match", [
    (torch.tensor([[0.0, 0.0, float("-inf")], [0.0, float("-inf"), float("-inf")]]), ValueError,
     r"attention_mask must be a padding mask \(bool, or 1 = a real token and 0 = padding\), got a floating mask"),
    (torch.ones(2, 3, dtype=torch.bool, device="meta"), RuntimeError,
     r"attention_mask must be on x's device \(cpu\), got meta"),
])
def test_unpad_input_bad_masks(mask, exc, match):
    """An additive float mask (0 = keep, -inf = hidden: flash_cuda's own float-mask convention)
    was read as nonzero = a real token, keeping the padding and dropping the tokens; a mask on
    another device gave indices there (audit by a helper)."""
    with pytest.raises(exc, match=r"flash_cuda.unpad_input: " + match):
        flash_cuda.unpad_input(torch.randn(2, 3, 4), mask)
    float01 = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # 0/1 floats: a padding mask
    x = torch.randn(2, 3, 4)
    assert all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
               for a, b in zip(flash_cuda.unpad_input(x, float01), flash_cuda.unpad_input(x, float01.bool())))


@pytest.mark.parametrize("batch,seqlen,exc,match", [
    (2**40, 4, RuntimeError, r"the padded output \(batch \* seqlen, ...\) of shape \(4398046511104, 4\) "
                             r"\(70368744177664 bytes\) could not be allocated: "),
    (2**70, 2, ValueError, r"batch \* seqlen must be at most 2\*\*63 - 1 \(the padded output's rows\), got "
                           r"1180591620717411303424 \* 2"),
])
def test_pad_input_past_memory(batch, seqlen, exc, match):
    """A size no memory holds: the error names pad_input's output and its size (the allocator's
    own message named neither, and 2**70 rows failed inside torch's argument parsing)."""
    xu, idx = unpadded()
    with pytest.raises(exc, match=r"flash_cuda.pad_input: " + match):
        flash_cuda.pad_input(xu, idx, batch, seqlen)


@pytest.mark.parametrize("dropout_p", [0.0, 0.5])
def test_dropout_mask_past_memory(dropout_p):
    """return_dropout_mask materialises (B, Hq, max_seqlen_q, max_seqlen_k): at lengths no memory
    holds the error names the mask and its size (the attention itself, over 5 tokens, runs)."""
    q = torch.randn(5, 2, 8)
    cu = torch.tensor([0, 5], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"flash_cuda.varlen_attention: return_dropout_mask's mask \(B, Hq, Nq, "
                                           r"Nk\) of shape \(1, 2, 2147483647, 2147483647\) \(9223372028264841218 "
                                           r"bytes\) could not be allocated: "):
        flash_cuda.varlen_attention(q, q, q, cu, cu, 2**31 - 1, 2**31 - 1, dropout_p=dropout_p,
                                    return_dropout_mask=True)


# flash_cuda.emulate's arguments

@pytest.mark.parametrize("kw,match", [
    (dict(seed="abc"), r"seed must be an int in \[0, 2\*\*63\), got 'abc'"),
    (dict(seed=None), r"seed must be an int"),
    (dict(seed=1.7), r"seed must be an int"),
    (dict(seed=2**70), r"seed must be an int in \[0, 2\*\*63\)"),
    (dict(seed=-1), r"seed must be an int"),
    (dict(workers=True), r"workers must be an int in \[1, 4096\]"),
    (dict(workers=2**40), r"workers must be an int in \[1, 4096\]"),
    (dict(workers=0), r"workers must be an int in \[1, 4096\]"),
    (dict(device=flash_cuda.DeviceProfile("x", (8,), 10, 1000)), r"compute_capability \(major, minor\) of ints, got"),
    (dict(device=flash_cuda.DeviceProfile("x", ("8", "0"), 10, 1000)), r"compute_capability \(major, minor\)"),
    (dict(device=flash_cuda.DeviceProfile(5, (8, 0), 10, 1000)), r"needs a str name"),
    (dict(device=flash_cuda.DeviceProfile("x", (8, 0), 0, 1000)), r"DeviceProfile.sm_count must be an int in \[1, 2\*\*31\)"),
    (dict(device=flash_cuda.DeviceProfile("x", (8, 0), 10, 2**40)), r"DeviceProfile.smem_per_block must be an int"),
    (dict(device=flash_cuda.DeviceProfile("x", (8, 0), 10, 1000, threads_per_block=1.5)),
     r"DeviceProfile.threads_per_block must be an int"),
])
def test_emulate_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=r"emulate: .*" + match):
        flash_cuda.emulate(**kw)


# Found by a randomised bad-input fuzzer (2026-12-05): each of these returned garbage or named the
# wrong thing before.

def _ops_calls(q, k, v, scale):
    """(name, thunk) of direct calls of the forward ops (and the backward) with this scale."""
    F = torch.ops.flash_cuda
    B, H, N, D = q.shape
    t3 = lambda x: x.transpose(1, 2).reshape(B * N, x.shape[1], D)  # noqa: E731
    cu = torch.arange(0, (B + 1) * N, N, dtype=torch.int32, device=q.device)
    return [("fwd", lambda: F.fwd(q, k, v, scale, False, True)),
            ("bwd", lambda: F.bwd(q, q, k, v, q, torch.zeros(B, H, N, dtype=q.dtype), None, scale, False, True)),
            ("varlen_fwd", lambda: F.varlen_fwd(t3(q), t3(k), t3(v), cu, cu, N, N, scale, False)),
            ("kvcache_fwd", lambda: F.kvcache_fwd(q, k, v, None, None, torch.full((B,), N, dtype=torch.int32), None,
                                                  scale, False))]


@pytest.mark.parametrize("which", ["cu_seqlens_q", "cu_seqlens_k"])
@pytest.mark.parametrize("bad", ["dtype", "length", "2-d"])
def test_dropout_mask_op_names_the_bad_cu_seqlens(which, bad):
    """The dropout-mask op called directly (as tests and tools do) names which cu_seqlens is wrong,
    with what it expects and what it got."""
    rng, B = torch.tensor([1, 2], dtype=torch.int64), 2
    good = torch.tensor([0, 3, 5], dtype=torch.int32)
    wrong = {"dtype": good.long(), "length": good[:2], "2-d": good.view(1, 3)}[bad]
    cu_q, cu_k = (wrong, good) if which == "cu_seqlens_q" else (good, wrong)
    got = rf"got {'Long' if bad == 'dtype' else 'Int'} of shape \[{'1, 3' if bad == '2-d' else len(wrong.reshape(-1))}\]"
    with pytest.raises(RuntimeError, match=rf"{which} must be int32 \(batch \+ 1,\) = \(3,\) .*{got}"):
        torch.ops.flash_cuda.dropout_mask(rng, 0.5, B, 1, 3, 3, cu_q, cu_k)
    assert torch.ops.flash_cuda.dropout_mask(rng, 0.5, B, 1, 3, 3, good, good).shape == (B, 1, 3, 3)


@pytest.mark.parametrize("which", ["k", "v", "out", "lse", "cu_seqlens_q", "alibi_slopes", "bias"])
def test_a_meta_tensor_among_cpu_tensors_is_an_error(which):
    """A meta tensor among CPU ones dispatches a direct op call to its fake kernel (Meta outranks
    CPU), which returned uninitialised CPU tensors: it names the tensor instead (ops.py
    _on_device_of), as the C++ ops do for a real device mismatch."""
    q, k, v = qkv()
    F = torch.ops.flash_cuda
    B, H, N, D = q.shape
    lse, meta = torch.zeros(B, H, N), lambda x: x.to("meta")
    match = rf"flash_cuda: {which} must be on q's device \(cpu\), got meta"
    with pytest.raises(RuntimeError, match=match):
        if which in ("k", "v"):
            F.fwd(q, meta(k) if which == "k" else k, meta(v) if which == "v" else v, 0.25, False, True)
        elif which in ("out", "lse"):
            F.bwd(q, q, k, v, meta(q) if which == "out" else q, meta(lse) if which == "lse" else lse, None, 0.25,
                  False, True)
        elif which == "cu_seqlens_q":
            t3 = lambda x: x.transpose(1, 2).reshape(B * N, x.shape[1], D)  # noqa: E731
            cu = torch.arange(0, (B + 1) * N, N, dtype=torch.int32)
            F.varlen_fwd(t3(q), t3(k), t3(v), meta(cu), cu, N, N, 0.25, False)
        elif which == "alibi_slopes":
            F.fwd(q, k, v, 0.25, False, True, False, -1, -1, 0.0, meta(torch.ones(1, H)))
        else:
            F.fwd(q, k, v, 0.25, False, True, False, -1, -1, 0.0, None, meta(torch.zeros(B, H, N, N)))
    # all meta: the fake kernels' shapes, as torch.compile and FakeTensorMode use them
    out, lse = F.fwd(meta(q), meta(k), meta(v), 0.25, False, True)
    assert out.device.type == "meta" and out.shape == q.shape and lse.shape == (B, H, N)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf"), 1e39,
                                   math.nextafter(3.4028234663852886e38, math.inf)])
def test_ops_check_scale_in_cpp_too(scale):
    """A direct op call with a scale the Python API refuses: an error, not NaN outputs (float64
    inputs take any finite scale); the refused value in all its digits (the last one, the double
    right after float32's max, printed as the max itself in 6)."""
    q, k, v = qkv()
    shown = re.escape(f"{scale:.17g}") if math.isfinite(scale) else ""
    for name, call in _ops_calls(q, k, v, scale):
        with pytest.raises(RuntimeError, match=r"flash_cuda: scale must be finite in float32 \(\|scale\| <= "
                                               r"3\.4028234663852886e\+38\), got " + shown):
            call()
    for name, call in _ops_calls(q.double(), k.double(), v.double(), scale):
        if math.isfinite(scale):
            call()
        else:
            with pytest.raises(RuntimeError, match=r"flash_cuda: scale must be finite, got"):
                call()


@pytest.mark.parametrize("name", ["scale", "softcap"])
def test_int_past_floats_range(name):
    with pytest.raises(ValueError, match=rf"{name} must be finite.*got an int of 1329 bits"):
        attention(*qkv(), **{name: 10**400})


@pytest.mark.parametrize("flag", ["causal", "return_lse", "deterministic"])
def test_numpy_bool_flag_is_named_as_such(flag):
    """A numpy bool is not a bool here (as torch's own bool arguments); the message says which type
    it got rather than a bare "bool"."""
    np = pytest.importorskip("numpy")
    with pytest.raises(TypeError, match=rf"{flag} must be a bool, got numpy\.bool"):
        attention(*qkv(), **{flag: np.bool_(True)})


def test_varlen_shape_errors_show_the_callers_shapes():
    q, k, v = torch.randn(6, 2, 16), torch.randn(7, 2, 32), torch.randn(7, 2, 32)
    cu_q, cu_k = torch.tensor([0, 6], dtype=torch.int32), torch.tensor([0, 7], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"k must have the head dim of q \(16\), got k of shape \(7, 2, 32\)"):
        flash_cuda.varlen_attention(q, k, v, cu_q, cu_k, 6, 7)
    k = torch.randn(7, 2, 16)
    with pytest.raises(ValueError, match=r"v must have the shape of k \(7, 2, 16\) \(same tokens, kv heads and head "
                                         r"dim\), got \(8, 2, 16\)"):
        flash_cuda.varlen_attention(q, k, torch.randn(8, 2, 16), cu_q, cu_k, 6, 7)


def test_emulated_kernels_name_a_max_seqlen_past_their_range():
    """varlen_attention takes max_seqlen up to 2**31 - 1; the CUDA kernels round lengths up to
    whole tiles in 32 bits and need less than 2**31 - 256: their error names max_seqlen."""
    q, k, v = (torch.randn(6, 2, 16, dtype=torch.float16) for _ in range(3))
    cu = torch.tensor([0, 6], dtype=torch.int32)
    with flash_cuda.emulate(), pytest.raises(RuntimeError, match=r"the CUDA kernels need sequence lengths and a "
                                                                 r"packed batch's token totals below 2\^31 - 256, "
                                                                 r"got max_seqlen_q 2147483647 and max_seqlen_k 6, "
                                                                 r"total_q 6 and total_k 6"):
        flash_cuda.varlen_attention(q, k, v, cu, cu, 2**31 - 1, 6)


def test_emulated_kernels_name_a_packed_total_past_their_range():
    """Short sequences whose packed total reaches 2**31 - 256 tokens: the error names the totals
    (it named max_seqlen only), raised before the call allocates its outputs (here 32 GiB: the
    inputs are one token expanded)."""
    total = 2**31 - 1
    q = torch.randn(1, 1, 8, dtype=torch.float16).expand(total, 1, 8)
    cu = torch.tensor([0, 2**30, total], dtype=torch.int32)
    with flash_cuda.emulate(), pytest.raises(RuntimeError, match=r"got max_seqlen_q 1073741824 and max_seqlen_k "
                                                                 r"1073741824, total_q 2147483647 and total_k "
                                                                 r"2147483647"):
        flash_cuda.varlen_attention(q, q, q, cu, cu, 2**30, 2**30)


# Numbers torch's own arguments take: numpy's real scalars are the numbers they hold

def test_numpy_scalars_are_taken_as_the_numbers_they_hold():
    """np.float32 / np.int64 arguments (a scale from a config, a length from numpy) are taken as
    the Python float / int they hold, as torch's float and int arguments take them: outputs equal
    the Python-number call's bitwise, and the reference's."""
    np = pytest.importorskip("numpy")
    from reference import attention_ref
    q, k, v = qkv(Nq=9, Nk=11)
    ours = attention(q, k, v, scale=np.float32(0.3), softcap=np.float64(4.0), window=(np.int64(3), np.int32(0)))
    plain = attention(q, k, v, scale=float(np.float32(0.3)), softcap=4.0, window=(3, 0))
    assert torch.equal(ours, plain)
    ref, _ = attention_ref(q, k, v, scale=float(np.float32(0.3)), softcap=4.0, window=(3, 0))
    assert (ours.double() - ref).abs().max() < 1e-5
    drops = [attention(q, k, v, dropout_p=p, generator=torch.Generator().manual_seed(5))
             for p in (np.float32(0.25), 0.25)]
    assert torch.equal(*drops) and not torch.equal(drops[0], plain)

    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    qv, kv_, vv = (x[0].transpose(0, 1)[:9].contiguous() for x in (q, k, v))
    assert torch.equal(flash_cuda.varlen_attention(qv, kv_, vv, cu, cu, np.int64(5), np.int32(5), causal=True),
                       flash_cuda.varlen_attention(qv, kv_, vv, cu, cu, 5, 5, causal=True))

    k_cache, v_cache = torch.zeros(2, 2, 16, 16), torch.zeros(2, 2, 16, 16)
    k_cache[:, :, :11], v_cache[:, :, :11] = k, v
    with torch.no_grad():
        got = flash_cuda.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=np.int64(11),
                                                num_splits=np.int64(2), scale=np.float32(0.5))
        want = flash_cuda.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=11, num_splits=2,
                                                 scale=float(np.float32(0.5)))
    assert torch.equal(got, want)

    xu, idx = unpadded()
    assert torch.equal(flash_cuda.pad_input(xu, idx, np.int64(2), np.uint8(3)), flash_cuda.pad_input(xu, idx, 2, 3))

    from flash_cuda.flash_attn_interface import flash_attn_func
    qf, kf, vf = (x.transpose(1, 2) for x in (q, k, v))
    assert torch.equal(flash_attn_func(qf, kf, vf, softmax_scale=np.float32(0.3), window_size=(np.int64(3), np.int8(0))),
                       flash_attn_func(qf, kf, vf, softmax_scale=float(np.float32(0.3)), window_size=(3, 0)))


@pytest.mark.parametrize("value,shown", [("bool", "numpy.bool"), ("array", "numpy.ndarray"),
                                         ("float", None)])
def test_numpy_values_that_are_not_numbers_here(value, shown):
    """A numpy bool is not a number for attention() (nor is Python's bool), a 0-d array is not a
    scalar (torch refuses both the array and, for its int arguments, a numpy bool)."""
    np = pytest.importorskip("numpy")
    x = {"bool": np.bool_(True), "array": np.array(0.5), "float": np.float32("nan")}[value]
    if shown is None:
        with pytest.raises(ValueError, match=r"scale must be finite, got nan"):
            attention(*qkv(), scale=x)
        return
    with pytest.raises(TypeError, match=rf"scale must be a float or None, got {shown}"):
        attention(*qkv(), scale=x)
    with pytest.raises(TypeError, match=rf"softcap must be a float \(0.0 disables it\), got {shown}"):
        attention(*qkv(), softcap=x)
    with pytest.raises(TypeError, match=r"window must be a pair of ints"):
        attention(*qkv(), window=(x, 0))


def test_sparse_and_nested_inputs_name_the_argument():
    """A sparse or nested q got torch's dispatcher error for flash_cuda::fwd, naming no argument."""
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(TypeError, match=r"flash_cuda.attention: k must be a dense \(strided\) tensor, got a "
                                        r"torch.sparse_coo one"):
        flash_cuda.attention(q, q.to_sparse(), q)
    nested = torch.nested.nested_tensor([torch.randn(2, 8, 16), torch.randn(2, 5, 16)])
    # (a jagged one runs, as in torch: test_sdpa_dropin.py::test_jagged_nested_tensors_like_torch)
    with pytest.raises(TypeError, match=r"query must be a jagged nested tensor \(torch.nested, layout=torch.jagged\) "
                                        r"when any input is one, got a strided nested tensor"):
        flash_cuda.scaled_dot_product_attention(nested, nested, nested)


@pytest.mark.parametrize("name", ["attn_mask", "alibi_slopes", "cu_seqlens_q", "cache_seqlens", "block_table",
                                  "attention_mask", "indices"])
def test_sparse_tensors_beside_q_k_v(name):
    """A sparse tensor for an argument other than q, k, v is refused naming it (torch's own ops
    failed on it first: "Could not run 'aten::bitwise_not' ... SparseCPU", naming nothing)."""
    q = torch.randn(1, 2, 4, 8)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    rows = q[0].transpose(0, 1)
    calls = {
        "attn_mask": lambda s: attention(q, q, q, attn_mask=s(torch.ones(1, 2, 4, 4, dtype=torch.bool))),
        "alibi_slopes": lambda s: attention(q, q, q, alibi_slopes=s(torch.ones(2))),
        "cu_seqlens_q": lambda s: flash_cuda.varlen_attention(rows, rows, rows, s(cu), cu, 4, 4),
        "cache_seqlens": lambda s: flash_cuda.attention_with_kvcache(
            q[:, :, :1], q, q, cache_seqlens=s(torch.tensor([2], dtype=torch.int32))),
        "block_table": lambda s: flash_cuda.attention_with_kvcache(
            q[:, :, :1], q, q, cache_seqlens=2, block_table=s(torch.zeros(1, 1, dtype=torch.int32))),
        "attention_mask": lambda s: flash_cuda.unpad_input(torch.randn(2, 3, 4), s(torch.ones(2, 3, dtype=torch.bool))),
        "indices": lambda s: flash_cuda.pad_input(torch.randn(3, 4), s(torch.arange(3)), 1, 3),
    }
    calls[name](lambda x: x)  # (valid as dense)
    with pytest.raises(TypeError, match=rf"^flash_cuda\.\w+: {name} must be a dense \(strided\) tensor, got a "
                                        r"torch.sparse_coo one"):
        calls[name](lambda x: x.to_sparse())
