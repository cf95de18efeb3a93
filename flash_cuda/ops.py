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
def _fwd_fake(q, k, v, scale, causal, bottom_right, deterministic=False):
    out = torch.empty_like(_unit_last_stride(q))
    lse = q.new_empty(q.shape[:3], dtype=accumulation_dtype(q.dtype))
    return out, lse


@torch.library.register_fake("flash_cuda::bwd")
def _bwd_fake(dout, q, k, v, out, lse, dlse, scale, causal, bottom_right, deterministic=False):
    return tuple(torch.empty_like(_unit_last_stride(x)) for x in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, scale, causal, bottom_right, *rest = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.args = (scale, causal, bottom_right, bool(rest[0]) if rest else False)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = torch.ops.flash_cuda.bwd(dout, q, k, v, out, lse, dlse, *ctx.args)
    return dq, dk, dv, None, None, None, None


torch.library.register_autograd("flash_cuda::fwd", _backward, setup_context=_setup_context)
