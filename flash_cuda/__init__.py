"""flash_cuda: FlashAttention for PyTorch.

    flash_cuda.attention(q, k, v, *, causal=False, scale=None, window=None, softcap=0.0,
                         alibi_slopes=None, attn_mask=None, dropout_p=0.0, generator=None,
                         return_lse=False, return_dropout_mask=False, deterministic=False)
    flash_cuda.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, ...)
    flash_cuda.attention_with_kvcache(q, k_cache, v_cache, k=None, v=None, *, cache_seqlens=None,
                                      block_table=None, causal=False, ..., num_splits=0)
    flash_cuda.unpad_input(x, attention_mask), flash_cuda.pad_input(x_unpad, indices, B, S)
    flash_cuda.scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                            is_causal=False, scale=None, enable_gqa=False)
    with flash_cuda.emulate(order="forward", check=True, device="a100") as emu:   # the CUDA kernels, on the CPU
        ...
    flash_cuda.EMULATED_DEVICES, flash_cuda.DeviceProfile: the GPUs emulate(device=...) knows
    flash_cuda.cuda_arch_list(): the TORCH_CUDA_ARCH_LIST the CUDA kernels were built for
    flash_cuda.empty_cpu_cache(): frees the buffers the CPU backend keeps for its next calls
"""
from . import ops  # noqa: F401  (registers the ops, their fake and autograd functions)
from .api import (attention, attention_with_kvcache, cuda_arch_list, empty_cpu_cache, has_cuda_kernels, pad_input,
                  scaled_dot_product_attention, unpad_input, varlen_attention)
from .emulate import DEVICES as EMULATED_DEVICES
from .emulate import DeviceProfile, emulate, ptx_kernels

__all__ = ["attention", "attention_with_kvcache", "scaled_dot_product_attention", "varlen_attention", "unpad_input", "pad_input",
           "has_cuda_kernels", "cuda_arch_list", "empty_cpu_cache", "emulate", "ptx_kernels", "DeviceProfile", "EMULATED_DEVICES"]
__version__ = "0.1.0"
