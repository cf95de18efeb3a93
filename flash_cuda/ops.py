"""Fake (shape) and autograd registrations of the flash_cuda::fwd / flash_cuda::bwd ops.

The ops themselves are defined in C++ (csrc/ops.cpp, TORCH_LIBRARY); importing
flash_cuda._C registers them with the dispatcher.
"""
import torch

from . import _C  # noqa: F401  (registers torch.ops.flash_cuda)


def accumulation_dtype(dtype):
    """dtype of lse and of the internal accumulators: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _unit_last_stride(x):
    # Mirrors csrc/ops.cpp: kernels need stride(-1) == 1, anything else is copied once.
    return x if x.stride(-1) == 1 else x.contiguous()


@torch.library.register_fake("flash_cuda::fwd")
def _fwd_fake(q, k, v, scale, causal, bottom_right, deterministic=False, window_left=-1, window_right=-1,
              softcap=0.0, alibi_slopes=None, bias=None):
    out = torch.empty_like(_unit_last_stride(q))
    lse = q.new_empty(q.shape[:3], dtype=accumulation_dtype(q.dtype))
    return out, lse


@torch.library.register_fake("flash_cuda::bwd")
def _bwd_fake(dout, q, k, v, out, lse, dlse, scale, causal, bottom_right, deterministic=False, window_left=-1,
              window_right=-1, softcap=0.0, alibi_slopes=None, bias=None, bias_grad=False):
    dq, dk, dv = (torch.empty_like(_unit_last_stride(x)) for x in (q, k, v))
    acc = accumulation_dtype(q.dtype)
    dbias = (q.new_empty((q.shape[0], q.shape[1], q.shape[2], k.shape[2]), dtype=acc) if bias_grad and bias is not None
             else q.new_empty((0,), dtype=acc))
    return dq, dk, dv, dbias


_BIAS = 11  # index of `bias` in fwd's inputs


def _setup_context(ctx, inputs, output):
    q, k, v = inputs[:3]
    out, lse = output
    inputs = list(inputs) + [None] * (12 - len(inputs))
    scale, causal, bottom_right, deterministic, wl, wr, softcap, alibi, bias = inputs[3:]
    ctx.save_for_backward(q, k, v, out, lse, alibi, bias)
    ctx.args = (scale, causal, bottom_right, bool(deterministic) if deterministic is not None else False,
                -1 if wl is None else wl, -1 if wr is None else wr, 0.0 if softcap is None else softcap)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, alibi, bias = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    bias_grad = bias is not None and ctx.needs_input_grad[_BIAS]
    dq, dk, dv, dbias = torch.ops.flash_cuda.bwd(dout, q, k, v, out, lse, dlse, *ctx.args, alibi, bias, bias_grad)
    return dq, dk, dv, None, None, None, None, None, None, None, None, dbias if bias_grad else None


torch.library.register_autograd("flash_cuda::fwd", _backward, setup_context=_setup_context)


@torch.library.register_fake("flash_cuda::varlen_fwd")
def _varlen_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal,
                     deterministic=False, window_left=-1, window_right=-1, softcap=0.0, alibi_slopes=None):
    out = torch.empty_like(_unit_last_stride(q))
    lse = q.new_empty((q.shape[1], q.shape[0]), dtype=accumulation_dtype(q.dtype))
    return out, lse


@torch.library.register_fake("flash_cuda::varlen_bwd")
def _varlen_bwd_fake(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                     causal, deterministic=False, window_left=-1, window_right=-1, softcap=0.0, alibi_slopes=None):
    return tuple(torch.empty_like(_unit_last_stride(x)) for x in (q, k, v))


def _varlen_setup_context(ctx, inputs, output):
    inputs = list(inputs) + [None] * (14 - len(inputs))
    q, k, v, cu_q, cu_k = inputs[:5]
    out, lse = output
    alibi = inputs[13]
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, alibi)
    max_q, max_k, scale, causal, deterministic, wl, wr, softcap = inputs[5:13]
    ctx.args = (max_q, max_k, scale, causal, bool(deterministic) if deterministic is not None else False,
                -1 if wl is None else wl, -1 if wr is None else wr, 0.0 if softcap is None else softcap)


def _varlen_backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k, alibi = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = torch.ops.flash_cuda.varlen_bwd(dout, q, k, v, out, lse, dlse, cu_q, cu_k, *ctx.args, alibi)
    return (dq, dk, dv) + (None,) * 11


torch.library.register_autograd("flash_cuda::varlen_fwd", _varlen_backward, setup_context=_varlen_setup_context)
