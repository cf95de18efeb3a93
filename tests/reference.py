"""Independent reference attention in plain torch, and FlashAttention's tolerance rule.

`attention_ref` computes softmax(scale * q k^T + mask) v with no tiling and no online
softmax: in float64 it is the reference; in float16/bfloat16 it is "the same computation
in plain torch at that precision" that the tolerance rule compares against.
"""
import math

import torch


def band_hidden(nq, nk, window, causal, bottom_right, device):
    """(nq, nk) bool, True where key j is outside query i's window (left, right) (-1: open;
    causal: right = 0), with d = j - (i + offset) as in flash_cuda.attention."""
    offset = nk - nq if bottom_right else 0
    d = torch.arange(nk, device=device)[None, :] - (torch.arange(nq, device=device)[:, None] + offset)
    left, right = window if window is not None else (-1, -1)
    if causal:
        right = 0
    hidden = torch.zeros(nq, nk, dtype=torch.bool, device=device)
    if left >= 0:
        hidden |= d < -left
    if right >= 0:
        hidden |= d > right
    return hidden, d


def attention_ref(q, k, v, causal=False, scale=None, bottom_right=True, dtype=torch.float64, window=None, softcap=0.0,
                  alibi_slopes=None, attn_mask=None, dropout_mask=None, dropout_p=0.0, matmul=None):
    """Returns (out, lse) computed in `dtype`; GQA by repeating k/v heads. The modifiers follow
    flash_cuda.attention's documented semantics, written out elementwise on the full score
    matrix: softcap, then ALiBi (-slope |d|), then the mask (bool: False hides; floating: added).
    Dropout with a given keep mask (bool, broadcastable to (B, Hq, Nq, Nk)): out =
    (softmax * keep / (1 - dropout_p)) v; lse unaffected. matmul: the product for q k^T and P V
    (default torch.matmul; the TF32 reference passes tf32_matmul).

    Rows that see no key give out = 0 and lse = -inf (flash_cuda's documented convention).
    """
    q, k, v = (x.to(dtype) for x in (q, k, v))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    matmul = torch.matmul if matmul is None else matmul
    s = matmul(q, k.transpose(-1, -2)) * scale
    nq, nk = q.shape[2], k.shape[2]
    hidden, d = band_hidden(nq, nk, window, causal, bottom_right, q.device)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(dtype).reshape(-1, q.shape[1])[:, :, None, None]  # (1 or B, Hq, 1, 1)
        s = s - slopes * d.abs().to(dtype)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            hidden = hidden | ~attn_mask
        else:
            s = s + attn_mask.to(dtype)
    hidden = hidden.expand(s.shape)
    s = s.masked_fill(hidden, float("-inf"))
    empty = (s == float("-inf")).all(-1, keepdim=True)  # rows that see no key
    s = s.masked_fill(empty, 0.0)
    lse = torch.logsumexp(s.to(torch.float64), dim=-1).masked_fill(empty[..., 0], float("-inf"))
    p = torch.softmax(s, dim=-1)
    if dropout_mask is not None:
        p = p * dropout_mask.to(dtype) / (1.0 - dropout_p)
    out = matmul(p, v).masked_fill(empty, 0.0)
    return out, lse


def saturation_terms(out, ref_kw, dout, q, k, v):
    """Gradients of FlashAttention's algorithm in float64 that uses the rounded O in
    D_i = rowsum(dO * O), minus the exact ones (the standard's saturated-softmax term): by
    d lse_i / d s_ij = P_ij, they are the gradients of -sum_i delta_i lse_i,
    delta_i = rowsum(dO * (O_rounded - O_exact)). With one-hot rows (Nk = 1, large scales)
    plain torch's gradients are exact while this term is not zero."""
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref_out, lse = attention_ref(*leaves, **ref_kw)
    delta = (dout.double() * (out.detach().double() - ref_out.detach())).sum(-1)
    lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    mask = ref_kw.get("attn_mask")
    wrt = leaves + ([mask] if mask is not None and mask.requires_grad else [])
    return torch.autograd.grad(-(delta * lse).sum(), wrt, allow_unused=True)


def max_err(x, ref):
    return (x.to(torch.float64) - ref.to(torch.float64)).abs().max().item() if x.numel() else 0.0


def assert_fa_rule(name, ours, plain, ref, factor, saturation=None):
    """FlashAttention's rule: err(ours) <= factor * err(plain torch, same dtype) + 1e-5, plus
    twice the saturated-softmax term when given (a gradient from saturation_terms)."""
    e_ours, e_plain = max_err(ours, ref), max_err(plain, ref)
    extra = 2 * saturation.abs().max().item() if saturation is not None and saturation.numel() else 0.0
    assert e_ours <= factor * e_plain + extra + 1e-5, (
        f"{name}: max abs error {e_ours:.3g} > {factor} x plain torch's {e_plain:.3g} + saturation {extra:.3g} + 1e-5")


def assert_close_fp(name, ours, ref, rtol=2e-5):
    """float32/float64: error within rtol of the reference's magnitude."""
    bound = rtol * max(1.0, ref.abs().max().item() if ref.numel() else 0.0)
    e = max_err(ours, ref)
    assert e <= bound, f"{name}: max abs error {e:.3g} > {bound:.3g}"


def assert_close_fp_or_plain(name, ours, plain, ref, rtol, factor):
    """float32: error within rtol of the reference's magnitude, or, where plain torch's own float32
    error is larger (an ill-conditioned draw: scores of magnitude ~100 at scale 3.0 and D = 128),
    within factor x that error + 1e-6, FlashAttention's rule at float32."""
    bound = max(rtol * max(1.0, ref.abs().max().item() if ref.numel() else 0.0), factor * max_err(plain, ref) + 1e-6)
    e = max_err(ours, ref)
    assert e <= bound, f"{name}: max abs error {e:.3g} > {bound:.3g}"


def random_layout(rnd, g, B, h, n, D, dtype):
    """A random (B, h, n, D) tensor in one of the layouts users pass: FlashAttention's (B, N, H, D)
    memory as a transposed view, or a view sliced out of longer rows (randomised tests)."""
    if rnd.random() < 0.5:
        return torch.randn(B, n, h, D, generator=g).to(dtype).transpose(1, 2)
    return torch.randn(B, h, n + 3, D, generator=g).to(dtype)[:, :, 2:n + 2]


def tf32(x):
    """x rounded to tf32 (10 explicit mantissa bits), to nearest with ties away from zero, as
    cvt.rna.tf32.f32 does; in float32."""
    bits = x.to(torch.float32).contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


class _Tf32Matmul(torch.autograd.Function):
    """a @ b in float32 with both operands rounded to tf32, as a TF32 tensor-core product; the
    backward's products round theirs too (dA = tf32(dC) tf32(b)^T, dB = tf32(a)^T tf32(dC))."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return tf32(a) @ tf32(b)

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        g = tf32(g)
        return g @ tf32(b).transpose(-1, -2), tf32(a).transpose(-1, -2) @ g


def tf32_matmul(a, b):
    """The products of "the same computation in plain torch at TF32 precision" (float32)."""
    return _Tf32Matmul.apply(a.float(), b.float())
