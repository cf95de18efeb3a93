"""flash_cuda: FlashAttention for PyTorch.

    flash_cuda.attention(q, k, v, *, causal=False, scale=None, return_lse=False)
    flash_cuda.scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                            is_causal=False, scale=None, enable_gqa=False)
    with flash_cuda.emulate(order="forward", check=True) as emu:   # the CUDA kernels, on the CPU
        ...
"""
from . import ops  # noqa: F401  (registers the ops, their fake and autograd functions)
from .api import attention, has_cuda_kernels, scaled_dot_product_attention
from .emulate import emulate

__all__ = ["attention", "scaled_dot_product_attention", "has_cuda_kernels", "emulate"]
__version__ = "0.1.0"
