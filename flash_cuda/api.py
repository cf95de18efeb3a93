"""Public API: argument checking and normalisation, then torch.ops.flash_cuda.fwd.

Every invalid argument raises TypeError (wrong type or dtype), ValueError (wrong shape or
value), RuntimeError (device problems) or NotImplementedError (a torch SDPA feature not
supported yet), with a message naming the argument and what is expected.
"""
import math
import numbers
import sys

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.nn.attention.bias import CausalBias, CausalVariant

from . import ops
from .emulate import emulate, runs_cuda_kernels

MAX_HEAD_DIM = 256
MAX_NUM_SPLITS = 128  # attention_with_kvcache: FlashAttention-2's limit (csrc/kernel_launch.h kMaxNumSplits)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_DTYPE_NAMES = "float16, bfloat16, float32 or float64"
_KERNEL_DTYPES = (torch.float16, torch.bfloat16)
_HAS_CUDA_KERNELS = torch._C._dispatch_has_kernel_for_dispatch_key("flash_cuda::fwd", "CUDA")


def has_cuda_kernels():
    """True when this build of flash_cuda contains the CUDA kernels."""
    return _HAS_CUDA_KERNELS


def cuda_arch_list():
    """The TORCH_CUDA_ARCH_LIST the CUDA kernels were built for, entries joined by ';' (None
    without CUDA kernels). A GPU it has no code for is refused at the first launch, naming it."""
    archs = torch.ops.flash_cuda._cuda_arch_list()
    return archs.replace(":", ";") if archs else None


def empty_cpu_cache():
    """Frees the memory the CPU backend keeps for its next calls; returns how many bytes.

    A call's temporaries (its GEMM operands, partial sums) come from a cache of the blocks earlier
    calls freed: up to 32 MiB of blocks of at most 8 MiB stay allocated between calls, so a loop of
    calls of the same shapes reuses pages the system already mapped instead of faulting fresh ones
    in (at short sequences that was up to half of a backward). Also the buffers of the KV-cache
    loop (decoding, few-row calls), kept for the next calls: up to about 1 MiB for each thread
    that ran one, per dtype. The CPU counterpart of torch.cuda.empty_cache()."""
    return torch.ops.flash_cuda._cpu_scratch_release()


def _shape(x):
    return tuple(x.shape)


def _check_dense(fn, name, x):
    """A strided tensor, not a sparse or nested one (whose ops failed in torch's own words)."""
    if x.layout != torch.strided or x.is_nested:
        raise TypeError(f"{fn}: {name} must be a dense (strided) tensor, got a {'nested' if x.is_nested else x.layout} "
                        "one")


def _check_tensors(fn, names, tensors, fp32=False):
    """Type, dtype and device of q, k, v (or query, key, value). fp32: the call has float32
    kernels (TF32 tensor cores)."""
    for name, x in zip(names, tensors):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {_type_name(x)}")
        _check_dense(fn, name, x)
    first, q = names[0], tensors[0]
    if q.dtype not in _DTYPES:
        raise TypeError(f"{fn}: {first} must have dtype {_DTYPE_NAMES}, got {q.dtype}")
    for name, x in zip(names[1:], tensors[1:]):
        if x.dtype != q.dtype:
            raise TypeError(f"{fn}: {name} must have the dtype of {first} ({q.dtype}), got {x.dtype}")
    for name, x in zip(names[1:], tensors[1:]):
        if x.device != q.device:
            raise RuntimeError(
                f"{fn}: {name} must be on the device of {first} ({q.device}), got {x.device}")
    if q.device.type == "cuda":
        if not _HAS_CUDA_KERNELS:
            raise RuntimeError(
                f"{fn}: {first} is a CUDA tensor but this build of flash_cuda has no CUDA kernels "
                "(it was built without a CUDA toolkit or without CUDA sources); use CPU tensors "
                "or reinstall with a CUDA toolkit")
    elif q.device.type not in ("cpu", "meta"):
        raise RuntimeError(f"{fn}: {first} is on device '{q.device}'; expected cpu or cuda")
    if runs_cuda_kernels(q):
        where = "on CUDA" if q.device.type == "cuda" else "inside flash_cuda.emulate()"
        if q.dtype not in _KERNEL_DTYPES and not (fp32 and q.dtype == torch.float32):
            took = "float16, bfloat16 or float32" if fp32 else "float16 or bfloat16"
            raise TypeError(f"{fn}: {first} has dtype {q.dtype}; the CUDA kernels take {took} "
                            f"{where} (float32 and float64 run on CPU tensors outside flash_cuda.emulate())")


def _check_shapes(fn, names, q, k, v, shown=None):
    """q (B, Hq, Nq, D), k and v (B, Hkv, Nk, D) with Hq % Hkv == 0 and 1 <= D <= 256; messages
    give the shapes of `shown` (the caller's tensors, when q, k, v are views of them)."""
    qn, kn, vn = names
    _, shown_k, shown_v = shown or (q, k, v)
    for name, x, dims in ((qn, q, "(B, Hq, Nq, D)"), (kn, k, "(B, Hkv, Nk, D)"),
                          (vn, v, "(B, Hkv, Nk, D)")):
        if x.dim() != 4:
            raise ValueError(f"{fn}: {name} must be 4-D {dims}, got shape {_shape(x)}")
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"{fn}: {kn} must have the batch size of {qn} ({q.shape[0]}), "
                         f"got {kn} of shape {_shape(shown_k)}")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"{fn}: {kn} must have the head dim of {qn} ({q.shape[3]}), "
                         f"got {kn} of shape {_shape(shown_k)}")
    if v.shape != k.shape:
        raise ValueError(f"{fn}: {vn} must have the shape of {kn} {_shape(shown_k)} "
                         f"(same {'tokens, kv heads' if shown else 'batch, kv heads, length'} and head dim), "
                         f"got {_shape(shown_v)}")
    hq, hkv = q.shape[1], k.shape[1]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"{fn}: the number of query heads ({hq}) must be a multiple "
                         f"of the number of key/value heads ({hkv}){', at least 1' if hkv == 0 else ''}")
    d = q.shape[3]
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"{fn}: head dim D (last dim of {qn}) must be in [1, {MAX_HEAD_DIM}], got {d}")


def _type_name(x):
    """A value's type for messages: module-qualified outside the builtins (numpy.bool, not bool)."""
    t = type(x)
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _plain(x):
    """numpy's real scalars (np.float32, np.int64, ...) as the Python float or int they hold, as
    torch's own float and int arguments take them; anything else as it is, for the checks to
    name its type. numpy's bool is not a number here (nor is Python's, by the checks)."""
    if isinstance(x, (int, float)) or not isinstance(x, numbers.Real):
        return x
    try:
        return int(x) if isinstance(x, numbers.Integral) else float(x)
    except (TypeError, ValueError):  # registered as a number but not one (np.timedelta64)
        return x


_FLOAT_MAX = sys.float_info.max


def _index(x):
    """An int argument as torch's int arguments (and FlashAttention's) take it: a Python int, a
    numpy integer, or a 0-d integer tensor (e.g. max_seqlen = lengths.max(), a host read where
    the tensor is on a GPU, as in FlashAttention)."""
    if isinstance(x, torch.Tensor) and x.dim() == 0 and not x.is_floating_point() and not x.is_complex() \
            and x.dtype != torch.bool:
        # item(), not int(): traced by non-strict torch.export, the value is data-dependent, where
        # int() asked for a concrete value and raised (an audit); item() gives a symbolic int
        return x.item()
    return _plain(x)


def _readable(t):
    """Whether the checks may read t's values: on the CPU (a CUDA read would synchronise), and not
    while compiling or under a fake mode (FakeTensorMode, make_fx's fake and symbolic tracing), nor
    a functionalized tensor (torch.func.functionalize: its wrapper has no storage to read, and
    tolist() raised torch's internal error; audit), where tensors hold no values to read."""
    return (t.device.type == "cpu" and not torch.compiler.is_compiling() and not is_fake(t)
            and not torch._is_functional_tensor(t))


def _is_int(x):
    """An int argument: a Python int (not a bool) or a torch.SymInt, the size of a dynamic dimension
    (torch.export's default mode and torch.compile(dynamic=True) pass those; refusing them made
    e.g. window=(q.shape[2] // 2, 0) unexportable)."""
    return isinstance(x, (int, torch.SymInt)) and not isinstance(x, bool)


def _finite(x):
    """math.isfinite for ints past float's range too (False there, where isfinite raises), by
    comparisons: torch.compile(dynamic=True) traces these numbers as symbols, which math.isfinite
    does not take."""
    if not isinstance(x, int):
        x = float(x)  # (a numpy float compared in its own type would overflow the bound)
    return -_FLOAT_MAX <= x <= _FLOAT_MAX


def _number(x):
    """A number for messages: an int past float's range by its size, not its thousand digits."""
    return x if _finite(x) or not isinstance(x, int) else f"an int of {x.bit_length()} bits"


_F32_MAX = torch.finfo(torch.float32).max  # (scale's bound below float64 inputs; the ops check it too)
_F32_TINY = torch.finfo(torch.float32).tiny  # (the smallest normal float32)


def _check_scale(fn, scale, head_dim, dtype=torch.float64):
    """A finite float, in float32's range unless the inputs are float64 (the kernels and the
    CPU backend take it in the accumulation dtype)."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    scale = _plain(scale)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{fn}: scale must be a float or None, got {_type_name(scale)}")
    if not _finite(scale):
        raise ValueError(f"{fn}: scale must be finite, got {_number(scale)}")
    if dtype != torch.float64 and abs(scale) > _F32_MAX:
        raise ValueError(f"{fn}: scale must be finite in float32 (|scale| <= {_F32_MAX:.4g}) "
                         f"for {dtype} inputs, got {scale}")
    if dtype != torch.float64 and abs(scale) < _F32_TINY:
        # below float32's normal range the CUDA kernels (flushing denormals) would see 0 where
        # they need a positive scale, and give NaN (audit); 0 is this scale's limit: uniform rows
        return 0.0
    return float(scale)


def _check_flag(fn, name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{fn}: {name} must be a bool, got {_type_name(value)}")


_INT64_MAX = 2**63 - 1  # the ops take int64 arguments
_INT32_MAX = 2**31 - 1


def _check_window(fn, window, name="window"):
    """(left, right) with -1 = unbounded, or None (no window)."""
    if window is None:
        return -1, -1
    if (not isinstance(window, (tuple, list)) or len(window) != 2
            or not all(_is_int(_plain(w)) for w in window)):
        raise TypeError(f"{fn}: {name} must be a pair of ints (left, right) or None, got {window!r}")
    left, right = map(_plain, window)
    if not (-1 <= left <= _INT64_MAX and -1 <= right <= _INT64_MAX):
        raise ValueError(f"{fn}: {name} entries must be in [-1, 2**63 - 1] (-1 = unbounded on that side), "
                         f"got {tuple(window)}")
    return left, right


def _check_softcap(fn, softcap, dtype=torch.float64):
    """0 (off) or a finite positive float, in float32's normal range unless the inputs are float64:
    the backends take it in float32, where a larger one was inf (NaN outputs) and a smaller one 0
    (softcap silently off; audit)."""
    softcap = _plain(softcap)
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"{fn}: softcap must be a float (0.0 disables it), got {_type_name(softcap)}")
    if not _finite(softcap) or softcap < 0:
        raise ValueError(f"{fn}: softcap must be finite and >= 0 (0.0 disables it), got {_number(softcap)}")
    if dtype != torch.float64 and softcap != 0 and not _F32_TINY <= softcap <= _F32_MAX:
        raise ValueError(f"{fn}: softcap must be 0 (off) or in float32's normal range [{_F32_TINY:.4g}, "
                         f"{_F32_MAX:.4g}] for {dtype} inputs, got {softcap}")
    return float(softcap)


def _check_alibi(fn, slopes, B, hq, device):
    """float32 (Hq,) or (B, Hq) on q's device -> (1 or B, Hq)."""
    if slopes is None:
        return None
    if not isinstance(slopes, torch.Tensor):
        raise TypeError(f"{fn}: alibi_slopes must be a torch.Tensor or None, got {_type_name(slopes)}")
    _check_dense(fn, "alibi_slopes", slopes)
    if slopes.dtype != torch.float32:
        raise TypeError(f"{fn}: alibi_slopes must be float32, got {slopes.dtype}")
    if slopes.device != device:
        raise RuntimeError(f"{fn}: alibi_slopes must be on the device of q ({device}), got {slopes.device}")
    if _shape(slopes) not in ((hq,), (B, hq)):
        raise ValueError(f"{fn}: alibi_slopes must have shape (Hq,) = ({hq},) or (B, Hq) = ({B}, {hq}), "
                         f"got {_shape(slopes)}")
    if slopes.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{fn}: alibi_slopes requires grad, but no gradient flows to it (the slopes are "
                         "constants, as in FlashAttention); pass alibi_slopes.detach()")
    return slopes.reshape(-1, hq)


def _mask_to_bias(fn, name, mask, q, nk, full_shape):
    """attn_mask (bool: True = takes part; floating: added to the scores), broadcastable to
    full_shape (..., Nq, Nk) -> an additive bias in the accumulation dtype, broadcast (not
    materialised) to (B, Hq, Nq, Nk). A floating mask keeps its autograd history."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor or None, got {_type_name(mask)}")
    _check_dense(fn, name, mask)
    if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        raise TypeError(f"{fn}: {name} must be bool (True = takes part) or floating (added to the scores), "
                        f"got {mask.dtype}")
    if mask.device != q.device:
        raise RuntimeError(f"{fn}: {name} must be on the device of the queries ({q.device}), got {mask.device}")
    ok = mask.dim() <= len(full_shape) and all(m in (1, f) for m, f in zip(reversed(mask.shape), reversed(full_shape)))
    if not ok:
        raise ValueError(f"{fn}: {name} of shape {_shape(mask)} is not broadcastable to {tuple(full_shape)}")
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    if mask.dtype == torch.bool:
        # out of place: under vmap a batched mask cannot fill an unbatched tensor in place
        bias = torch.zeros(mask.shape, dtype=acc, device=mask.device).masked_fill(~mask, float("-inf"))
    else:
        bias = mask.to(acc)
    bias = bias.expand(tuple(full_shape))
    return bias.reshape(q.shape[0], q.shape[1], q.shape[2], nk) if bias.dim() != 4 else bias


def _check_dropout(fn, dropout_p, generator, return_dropout_mask, device, closed=False):
    """dropout_p a float in [0, 1) ([0, 1] when closed: the drop-in, as torch); generator None or a
    torch.Generator of q's device."""
    interval = "[0, 1]" if closed else "[0, 1)"
    dropout_p = _plain(dropout_p)
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"{fn}: dropout_p must be a float in {interval}, got {_type_name(dropout_p)}")
    if not (0.0 <= dropout_p <= 1.0 if closed else 0.0 <= dropout_p < 1.0):
        raise ValueError(f"{fn}: dropout_p must be in {interval}, got {_number(dropout_p)}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"{fn}: generator must be a torch.Generator or None, got {_type_name(generator)}")
        gd = generator.device
        if gd.type != device.type or (gd.index is not None and device.index is not None and gd.index != device.index):
            raise ValueError(f"{fn}: generator must be a torch.Generator of q's device ({device}), got one of {gd}")
    _check_flag(fn, "return_dropout_mask", return_dropout_mask)
    return float(dropout_p)


def _max_seqlen_range_message():
    """torch._check's message for a symbolic max_seqlen out of range (a constant: see its use)."""
    return ("flash_cuda.varlen_attention: max_seqlen_q and max_seqlen_k must be in [0, 2**31 - 1] (lengths are int32, "
            "as cu_seqlens)")


def _rng_state(q, nk, dropout_p, generator, inputs=()):
    """(seed, offset) for one call with dropout and nk keys per row (csrc/kernels/philox.h), or None
    without; the op reserves what the call draws of the generator's offset. inputs: the call's
    other tensors (None for absent ones), for vmap's `randomness` under torch.compile (the op's
    rule runs when any input is batched)."""
    if dropout_p == 0.0:
        return None
    if _in_vmap():
        if q.numel() == 0 or nk == 0:  # nothing to mask: no draw, as philox_state draws none there
            return torch.zeros(2, dtype=torch.int64, device=q.device)
        # a seed from torch's own random op, which follows vmap's `randomness` whichever inputs
        # are batched: the same mask in every slice ("same"), a mask of its own in each
        # ("different", at every vmap level), torch's error ("error", vmap's default); the offset
        # 0, as the CPU generator's states have
        seed = torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64, device=q.device, generator=generator)
        return torch.cat([seed, torch.zeros_like(seed)])
    return torch.ops.flash_cuda.philox_state(q, nk, [x for x in inputs if x is not None], generator)


def _in_vmap():
    """Inside torch.func.vmap, eager (dynamo cannot trace the interpreter stack: compiled, the
    op's vmap rule, ops._philox_state_vmap, follows `randomness`)."""
    if torch.compiler.is_compiling() or not torch._C._are_functorch_transforms_active():
        return False
    return any(i.key() == torch._C._functorch.TransformType.Vmap
               for i in torch._C._functorch.get_interpreter_stack() or ())


def _unallocatable(fn, what, shape, itemsize, err):
    """An allocation's failure (out of memory, a size past the allocator's range), re-raised as its
    own type with what was being made and how large."""
    return type(err)(f"{fn}: {what} of shape {tuple(shape)} ({math.prod(shape) * itemsize} bytes) could not be "
                     f"allocated: {err}")


def _dropout_mask(fn, rng_state, dropout_p, shape, device, cu_seqlens_q=None, cu_seqlens_k=None):
    """The keep mask a call used, materialised as bool `shape` (B, H, Nq, Nk); packed sequences:
    False past each sequence's lengths, with or without dropout."""
    try:
        if rng_state is None:
            if cu_seqlens_q is None:
                return torch.ones(shape, dtype=torch.bool, device=device)
            keep = torch.empty(shape, dtype=torch.bool, device=device)  # (first: the largest)
            lq, lk = (c[1:] - c[:-1] for c in (cu_seqlens_q, cu_seqlens_k))  # on their device: no host read
            rows = torch.arange(shape[2], device=device)[:, None] < lq[:, None, None]  # (B, Nq, 1)
            cols = torch.arange(shape[3], device=device) < lk[:, None, None]  # (B, 1, Nk)
            return keep.copy_((rows & cols)[:, None].expand(shape))
        return torch.ops.flash_cuda.dropout_mask(rng_state, dropout_p, *shape, cu_seqlens_q, cu_seqlens_k)
    except RuntimeError as err:
        if torch.compiler.is_compiling():
            raise
        raise _unallocatable(fn, "return_dropout_mask's mask (B, Hq, Nq, Nk)", shape, 1, err) from err


def _check_options(fn, q, batch, causal, return_lse, deterministic, scale, window, softcap, alibi_slopes):
    """The arguments attention, varlen_attention and attention_with_kvcache share -> (scale, left, right,
    softcap, slopes)."""
    _check_flag(fn, "causal", causal)
    _check_flag(fn, "return_lse", return_lse)
    _check_flag(fn, "deterministic", deterministic)
    scale = _check_scale(fn, scale, q.shape[-1], q.dtype)
    left, right = _check_window(fn, window)
    softcap = _check_softcap(fn, softcap, q.dtype)
    return scale, left, right, softcap, _check_alibi(fn, alibi_slopes, batch, q.shape[1], q.device)


def attention(q, k, v, *, causal=False, scale=None, window=None, softcap=0.0, alibi_slopes=None, attn_mask=None,
              dropout_p=0.0, generator=None, return_lse=False, return_dropout_mask=False, deterministic=False):
    """Exact attention softmax(scale * q k^T + modifiers) v, computed by FlashAttention.

    q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D) with Hq % Hkv == 0 (query head h uses kv head
    h // (Hq // Hkv)); any strides with stride(-1) == 1 are used without a copy, so a
    (B, N, H, D) tensor x is passed as x.transpose(1, 2). dtypes float16, bfloat16, float32
    (and float64 on CPU); 1 <= D <= 256.

    With s = scale * q_i . k_j and d = j - (i + Nk - Nq), the key's offset from the query's
    bottom-right diagonal:
    causal: query i sees keys with d <= 0 (window right = 0).
    window: (left, right): query i sees key j only if -left <= d <= right; -1 = unbounded on
        that side (FlashAttention-2's window_size). Combines with causal (right becomes 0). Key
        tiles outside the band are skipped: the cost grows with N x window, not N^2.
    softcap: c > 0 replaces s by c * tanh(s / c) before the rest (Gemma 2's logit softcap).
    alibi_slopes: float32 (Hq,) or (B, Hq); adds -slope * |d| to s (ALiBi).
    attn_mask: broadcastable to (B, Hq, Nq, Nk): bool (True = takes part) or floating (added to
        s), as in torch SDPA; broadcast dims are read with stride 0. A floating mask that
        requires grad gets its gradient (summed over broadcast dims); the backward then holds a
        dense (B, Hq, Nq, Nk) float32 gradient before summing.
    Rows that see no key (e.g. causal with Nq > Nk, or fully masked) give 0 and lse = -inf.
    scale: defaults to 1 / sqrt(D).
    dropout_p: attention dropout, applied whenever > 0 (pass 0.0 in eval, as with torch SDPA):
        out = (softmax(s) * keep / (1 - dropout_p)) v, lse unaffected. The keep mask is a pure
        function of (seed, offset, b, h, i, j) by Philox4x32-10 (README "Dropout"), never stored:
        the backward regenerates it. (seed, offset) come from `generator` (a torch.Generator of
        q's device) or the default generator of q's device, so torch.manual_seed makes a step
        repeatable; on CUDA they are read on the device (safe under CUDA graph capture).
    return_lse: also return lse (B, Hq, Nq), the natural log of the softmax denominator with
        the scale included, in float32 (float64 for float64 inputs). Gradients flow through it.
    return_dropout_mask: also return the keep mask, bool (B, Hq, Nq, Nk), materialised (memory
        hungry: for tests and debugging), last: out, [lse,] keep.
    deterministic: make the backward bitwise repeatable on CUDA (dQ from a second pass over the
        key tiles instead of atomic adds: about 7/5 of the backward's tensor-core work); also on
        under torch.use_deterministic_algorithms(True), as torch's flash backward. The CPU
        backend is deterministic either way (for a fixed number of threads).
    """
    fn = "flash_cuda.attention"
    _check_tensors(fn, ("q", "k", "v"), (q, k, v), fp32=True)
    _check_shapes(fn, ("q", "k", "v"), q, k, v)
    scale, left, right, softcap, slopes = _check_options(fn, q, q.shape[0], causal, return_lse, deterministic, scale,
                                                         window, softcap, alibi_slopes)
    dropout_p = _check_dropout(fn, dropout_p, generator, return_dropout_mask, q.device)
    B, hq, nq, nk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    bias = _mask_to_bias(fn, "attn_mask", attn_mask, q, nk, (B, hq, nq, nk))
    rng_state = _rng_state(q, nk, dropout_p, generator, (k, v, bias, slopes))
    out, lse = ops.fwd(q, k, v, scale, causal, True, deterministic or torch.are_deterministic_algorithms_enabled(),
                       left, right, softcap, slopes, bias, dropout_p, rng_state)
    result = (out, lse) if return_lse else (out,)
    if return_dropout_mask:
        result += (_dropout_mask(fn, rng_state, dropout_p, (B, hq, nq, nk), q.device),)
    return result if len(result) > 1 else out


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                 is_causal=False, scale=None, enable_gqa=False):
    """Drop-in for torch.nn.functional.scaled_dot_product_attention.

    Same semantics: shapes (..., L, E) with the head dim at -3, the leading dims broadcast
    between query, key and value as torch's matmuls broadcast them (broadcast dims are read
    with stride 0), causal masks aligned to the top-left corner (query i sees keys j <= i),
    enable_gqa as in torch (key and value heads each divide the query heads; without it the
    head dim broadcasts like the others), attn_mask broadcastable to (..., L, S): bool (True =
    takes part) or floating (added to the scores), or a torch.nn.attention.bias CausalBias
    (causal_upper_left, causal_lower_right: the causal mask aligned to that corner), not together
    with is_causal (torch rejects it too); jagged nested tensors (torch.nested, layout=torch.jagged)
    as torch takes them, run as packed sequences (_sdpa_jagged); a row whose keys are all masked
    gives 0, as torch does; dropout_p > 0 applies
    dropout as attention() does (torch semantics: whenever dropout_p > 0, from the default
    generator of query's device); dropout_p = 1 drops every probability, the output is 0 (as
    torch). Under torch.autocast, floating inputs other than float64 (the mask included) are
    cast to its dtype first, as torch casts them for this op.
    Not supported yet, with a NotImplementedError: a value head dim different from the query's.
    """
    fn = "flash_cuda.scaled_dot_product_attention"
    # torch takes any real number (a numpy float, a bool or numpy bool, a 0-d tensor that requires
    # no grad) for dropout_p and scale as the float it converts to (an int past float's range is
    # left for the checks to name), and dropout_p = 1 (everything dropped, out 0); the op takes [0, 1)
    def as_float(x):
        real = (isinstance(x, numbers.Real) or _type_name(x) in ("numpy.bool", "numpy.bool_")
                or (isinstance(x, torch.Tensor) and x.dim() == 0 and not x.requires_grad))
        return float(x) if real and (_finite(x) or not isinstance(x, int)) else x

    dropout_p, scale = as_float(dropout_p), None if scale is None else as_float(scale)
    dropout_p = _check_dropout(fn, dropout_p, None, False, getattr(query, "device", None), closed=True)
    drop_all = dropout_p == 1.0
    dropout_p = 0.0 if drop_all else dropout_p
    if any(getattr(x, "is_nested", False) for x in (query, key, value)):
        return _sdpa_jagged(fn, query, key, value, attn_mask, dropout_p, drop_all, is_causal, scale, enable_gqa)
    bottom_right, causal_bias = False, None
    if isinstance(attn_mask, CausalBias):  # torch.nn.attention.bias.causal_upper_left / causal_lower_right
        _check_flag(fn, "is_causal", is_causal)
        if is_causal is True:
            raise ValueError(f"{fn}: attn_mask (a CausalBias) must not be used with is_causal=True (torch rejects "
                             "the combination too)")
        causal_bias, attn_mask, is_causal = attn_mask, None, True
        bottom_right = causal_bias.variant == CausalVariant.LOWER_RIGHT
    if attn_mask is not None and is_causal is True:
        raise ValueError(f"{fn}: attn_mask must be None when is_causal=True (torch rejects the combination "
                         "too); fold the causal mask into attn_mask instead")
    _check_flag(fn, "is_causal", is_causal)
    _check_flag(fn, "enable_gqa", enable_gqa)
    names = ("query", "key", "value")
    query, key, value, attn_mask = _autocast(query, key, value, attn_mask)  # (non-tensors: as they are)
    _check_tensors(fn, names, (query, key, value), fp32=True)
    for name, x in zip(names, (query, key, value)):
        if x.dim() < 2:
            raise ValueError(f"{fn}: {name} must have at least 2 dims (..., L, E), got shape {_shape(x)}")
    if value.shape[-1] != query.shape[-1]:
        raise NotImplementedError(f"{fn}: value must have the head dim of query ({query.shape[-1]}); "
                                  f"a different value head dim is not supported yet, got {value.shape[-1]}")
    if key.shape[-1] != query.shape[-1]:
        raise ValueError(f"{fn}: key must have the head dim of query ({query.shape[-1]}), got key of shape "
                         f"{_shape(key)}")
    if key.shape[-2] != value.shape[-2]:
        raise ValueError(f"{fn}: value must have the length of key ({key.shape[-2]}), got value of shape "
                         f"{_shape(value)}")
    batch, heads, (k, v) = _sdpa_heads(fn, query, key, value, enable_gqa)
    L, S, E = query.shape[-2], key.shape[-2], query.shape[-1]
    out_shape = (*batch, heads, L, E) if max(query.dim(), key.dim(), value.dim()) >= 3 else (L, E)
    # (torch runs an upper-left CausalBias as is_causal on the inputs' lengths, whatever it was made
    # for; a lower-right one made for other lengths it refuses)
    if bottom_right and (causal_bias.seq_len_q, causal_bias.seq_len_kv) != (L, S):
        raise ValueError(f"{fn}: attn_mask (a lower-right CausalBias) must be made for the query and key lengths "
                         f"({L}, {S}), got one for ({causal_bias.seq_len_q}, {causal_bias.seq_len_kv})")
    B = math.prod(batch)
    # (B, H, N, E) for the op: broadcast dims are stride-0 views (a copy only where several batch
    # dims, some broadcast, cannot be merged); their gradients are summed by autograd
    def as_4d(x, h, n):  # (one batch dim already: as it is, the common call's cost)
        if x.dim() == 4 and len(batch) == 1 and x.shape[0] == B and x.shape[1] == h:
            return x
        return x.expand(*batch, h, n, E).reshape(B, h, n, E)

    q = as_4d(query, heads, L)
    k, v = (as_4d(x, x.shape[-3], S) for x in (k, v))
    if attn_mask is not None and isinstance(attn_mask, torch.Tensor):  # torch takes leading unit dims past L, S's
        while attn_mask.dim() > len(out_shape) and attn_mask.shape[0] == 1:
            attn_mask = attn_mask[0]
    if heads == 0 or E == 0:  # nothing to compute; torch's empty output, gradients zeros
        _check_scale(fn, scale, E or 1, q.dtype)
        _mask_to_bias(fn, "attn_mask", attn_mask, q, S, out_shape[:-1] + (S,))  # (its checks)
        parts = [x.sum() for x in (query, key, value) + ((attn_mask,) if attn_mask is not None
                                                          and attn_mask.is_floating_point() else ())]
        return query.new_zeros(out_shape) + sum(parts).to(query.dtype) * 0
    _check_shapes(fn, names, q, k, v)
    scale = _check_scale(fn, scale, q.shape[-1], q.dtype)
    bias = _mask_to_bias(fn, "attn_mask", attn_mask, q, S, out_shape[:-1] + (S,))
    rng_state = _rng_state(q, S, dropout_p, None, (k, v, bias))
    out, _ = ops.fwd(q, k, v, scale, is_causal, bottom_right, torch.are_deterministic_algorithms_enabled(), -1, -1,
                     0.0, None, bias, dropout_p, rng_state)
    if drop_all:  # torch's P * 0: zeros (NaN where P or V has one), gradients 0
        out = out * 0.0
    return out.reshape(out_shape)


def _sdpa_jagged(fn, query, key, value, attn_mask, dropout_p, drop_all, is_causal, scale, enable_gqa):
    """The SDPA drop-in on jagged nested tensors (torch.nested, layout=torch.jagged), as torch's
    SDPA takes them: (B, H, j, E) views of (B, j, H, E) sequences of different lengths, key and
    value with one ragged structure, no attn_mask. They are packed sequences already: their
    values (total, H, E) and offsets (the cu_seqlens) go to varlen_attention as they are, and
    the output is a nested tensor on query's offsets. is_causal (top-left per sequence) needs
    each query sequence as long as its key sequence, where both corners agree."""
    names = ("query", "key", "value")
    for name, x in zip(names, (query, key, value)):
        if not (isinstance(x, torch.Tensor) and x.is_nested and x.layout == torch.jagged):
            got = (_type_name(x) if not isinstance(x, torch.Tensor) else
                   "a strided nested tensor" if x.is_nested else "a dense tensor")
            raise TypeError(f"{fn}: {name} must be a jagged nested tensor (torch.nested, layout=torch.jagged) "
                            f"when any input is one, got {got}")
        if x.dim() != 4 or x._ragged_idx != 2:
            raise ValueError(f"{fn}: {name} must be a (B, H, j, E) nested tensor (a (B, j, H, E) one transposed "
                             f"with .transpose(1, 2)), got {x.dim()} dims with the ragged dim at {x._ragged_idx}")
    if attn_mask is not None:
        raise NotImplementedError(f"{fn}: attn_mask is not supported with nested tensors (as in torch); the "
                                  "sequences' own lengths are the mask")
    _check_flag(fn, "is_causal", is_causal)
    _check_flag(fn, "enable_gqa", enable_gqa)
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # (B, j, H, E)
    off_q, off_k, off_v = (x.offsets() for x in (q, k, v))
    kv_msg = f"{fn}: key and value must have the same sequence lengths"
    if off_k.shape != off_v.shape or not _same_values(off_k, off_v, kv_msg):
        raise ValueError(kv_msg)
    if off_q.shape != off_k.shape:
        raise ValueError(f"{fn}: query and key must have the same batch size, got {off_q.numel() - 1} and "
                         f"{off_k.numel() - 1}")
    causal_msg = (f"{fn}: is_causal with nested tensors needs each query sequence as long as its key sequence "
                  "(self-attention); use flash_cuda.varlen_attention(causal=True) for bottom-right alignment")
    if is_causal and not _same_values(off_q, off_k, causal_msg):
        raise NotImplementedError(causal_msg)
    hq, hk, hv = (x.shape[2] for x in (q, k, v))
    if hk != hv or (hq != hk and not (enable_gqa and hk and hq % hk == 0)):
        raise ValueError(f"{fn}: key and value must have as many heads as query ({hq}), or with enable_gqa=True "
                         f"a number that divides it, got {hk} and {hv}")
    if q.shape[-1] != k.shape[-1] or v.shape[-1] != q.shape[-1]:
        raise ValueError(f"{fn}: query, key and value must have one head dim, got {q.shape[-1]}, {k.shape[-1]} and "
                         f"{v.shape[-1]}")
    # the longest sequence: the nested tensor's (a host read of its offsets where not cached, as in
    # torch); compiled, where that read is data-dependent, the total (a bound: it only sizes the
    # CUDA kernels' grid, whose extra blocks exit at once)
    lengths = [x.values().shape[0] if torch.compiler.is_compiling() else x._max_seqlen for x in (q, k)]
    vq, vk, vv = _autocast(q.values(), k.values(), v.values())
    out = varlen_attention(vq, vk, vv, off_q.to(torch.int32), off_k.to(torch.int32), lengths[0], lengths[1],
                           causal=is_causal, scale=scale, dropout_p=dropout_p)
    if drop_all:
        out = out * 0.0
    seqlens = {} if torch.compiler.is_compiling() else dict(min_seqlen=q._min_seqlen, max_seqlen=q._max_seqlen)
    nested = torch.nested.nested_tensor_from_jagged(out, off_q, **seqlens)
    return nested.transpose(1, 2)


def _same_values(a, b, msg):
    """Whether two offsets tensors of one shape hold the same values: the same tensor, or equal by
    a host read; compiled on the CPU, checked as the graph runs instead (torch.equal's host read
    broke the graph), failing with msg there (not on a GPU, where Inductor's device assert is off
    outside debug builds: the host read stays)."""
    if a is b:
        return True
    if torch.compiler.is_compiling() and a.device.type == "cpu":
        torch._assert_async((a == b).all(), msg)
        return True
    return bool(torch.equal(a, b))


def _autocast(*tensors):
    """torch's autocast rule for attention, an op autocast runs in lower precision: inside
    torch.autocast for the inputs' device, floating tensors other than float64 are cast to its
    dtype (outside it, or for None, as they are)."""
    if not torch._C._is_any_autocast_enabled():  # (0.15 us; the per-device query below takes 1)
        return tensors
    device = tensors[0].device.type if isinstance(tensors[0], torch.Tensor) else None
    if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != torch.float64
                 else x for x in tensors)


def _sdpa_heads(fn, query, key, value, enable_gqa):
    """torch SDPA's broadcasting of (..., H, L, E) inputs -> (batch dims, query heads, (key, value)
    with one number of kv heads that divides the query heads). Without enable_gqa every leading
    dim broadcasts, heads included (a one-head key or value serves every query head; a one-head
    query is read by every kv head); with it, key and value heads must divide the query heads
    (query head h reads kv head h // (Hq // Hkv)) and the dims before them broadcast."""
    if query.dim() == key.dim() == value.dim() >= 3:  # the common call: one batch shape, kv heads dividing
        hq, hk = query.shape[-3], key.shape[-3]
        if (query.shape[:-3] == key.shape[:-3] == value.shape[:-3] and hk == value.shape[-3] and hq and hk
                and (hq == hk or hk == 1 or (enable_gqa and hq % hk == 0))):
            return tuple(query.shape[:-3]), hq, (key, value)

    def lead(x):  # the dims before the head dim, and the head dim (1 where x has none)
        dims = tuple(x.shape[:-2])
        return dims[:-1] if dims else (), (dims[-1] if dims else 1)

    leads = [lead(x) for x in (query, key, value)]
    try:  # (broadcast_shapes takes 8 us; the common call has one batch shape)
        batch = leads[0][0] if leads[0][0] == leads[1][0] == leads[2][0] else \
            tuple(torch.broadcast_shapes(*(b for b, _ in leads)))
    except RuntimeError:
        raise ValueError(f"{fn}: the batch dims of query {_shape(query)[:-3]}, key {_shape(key)[:-3]} and value "
                         f"{_shape(value)[:-3]} (before the head dim, -3) do not broadcast") from None
    hq, hk, hv = (h for _, h in leads)
    if enable_gqa:
        for name, x in (("query", query), ("key", key), ("value", value)):
            if x.dim() < 3:  # (torch: an IndexError)
                raise ValueError(f"{fn}: enable_gqa needs a head dim (-3) in {name}, got shape {_shape(x)}")
        for name, h in (("key", hk), ("value", hv)):
            if h == 0 and hq == 0:
                continue
            if h == 0 or hq % h:
                raise ValueError(f"{fn}: with enable_gqa the number of {name} heads ({h}) must divide the number "
                                 f"of query heads ({hq})")
        heads = hq
    else:
        heads = hq if hq != 1 else (hk if hk != 1 else hv)  # the size the others match or broadcast from
        for name, h in (("key", hk), ("value", hv)):
            if h not in (1, heads):
                hint = "; pass enable_gqa=True for grouped-query attention" if hq and h and hq % h == 0 else ""
                raise ValueError(f"{fn}: {name} must have as many heads as query ({hq}) or one, or query one "
                                 f"(heads broadcast as torch's batch dims), got {h}{hint}")
        if hq not in (1, heads):
            raise ValueError(f"{fn}: query must have as many heads as key and value ({heads}) or one, got {hq}")
    k, v = (x if x.dim() >= 3 else x.unsqueeze(0) for x in (key, value))
    if hk != hv and heads:  # one kv head count for the op: the fewer heads repeated (each divides heads)
        if hv % hk == 0:
            k = k.repeat_interleave(hv // hk, dim=-3) if hk > 1 else k.expand(*k.shape[:-3], hv, *k.shape[-2:])
        elif hk % hv == 0:
            v = v.repeat_interleave(hk // hv, dim=-3) if hv > 1 else v.expand(*v.shape[:-3], hk, *v.shape[-2:])
        else:
            k, v = (x.repeat_interleave(heads // h, dim=-3) for x, h in ((k, hk), (v, hv)))
    return batch, heads, (k, v)


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal=False, scale=None,
                     window=None, softcap=0.0, alibi_slopes=None, dropout_p=0.0, generator=None, return_lse=False,
                     return_dropout_mask=False, deterministic=False):
    """Attention over packed variable-length sequences (FlashAttention's varlen interface).

    q: (total_q, Hq, D); k, v: (total_k, Hkv, D), every sequence's tokens back to back (any
    strides with stride(-1) == 1). cu_seqlens_q, cu_seqlens_k: int32 (B + 1,), starting at 0,
    non-decreasing, ending at most at total_q / total_k (rows past the end belong to no sequence:
    out 0, lse -inf, zero gradients): sequence b is queries
    cu_seqlens_q[b]:cu_seqlens_q[b+1] against keys cu_seqlens_k[b]:cu_seqlens_k[b+1], and
    nothing else. max_seqlen_q/k: ints at least every sequence's length. causal (bottom-right
    per sequence), scale, window, softcap, alibi_slopes ((Hq,) or (B, Hq)) and dropout_p / generator
    as in attention() (the keep mask of sequence b is that of batch entry b, rows and columns
    counted within the sequence; return_dropout_mask gives it as (B, Hq, max_seqlen_q,
    max_seqlen_k), False past each sequence's lengths) and deterministic (a bitwise repeatable
    backward on CUDA) as in attention().
    Zero-length sequences are allowed; queries of a sequence without keys give 0 and lse -inf.

    Returns out (total_q, Hq, D), and with return_lse also lse (Hq, total_q) float32 (float64 for
    float64 inputs). The values of CPU cu_seqlens are checked here; CUDA ones are not (that would
    synchronise with the GPU): the kernels clamp them to the tensors, so wrong ones give wrong
    values, never an illegal memory access.
    """
    fn = "flash_cuda.varlen_attention"
    _check_tensors(fn, ("q", "k", "v"), (q, k, v), fp32=True)
    for name, x, dims in (("q", q, "(total_q, Hq, D)"), ("k", k, "(total_k, Hkv, D)"), ("v", v, "(total_k, Hkv, D)")):
        if x.dim() != 3:
            raise ValueError(f"{fn}: {name} must be 3-D {dims}, got shape {_shape(x)}")
    _check_shapes(fn, ("q", "k", "v"), *(x.transpose(0, 1)[None] for x in (q, k, v)), shown=(q, k, v))
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {_type_name(cu)}")
        _check_dense(fn, name, cu)
        if cu.dtype != torch.int32:
            raise TypeError(f"{fn}: {name} must be int32, got {cu.dtype}")
        if cu.dim() != 1 or cu.numel() < 1:
            raise ValueError(f"{fn}: {name} must be 1-D with B + 1 entries, got shape {_shape(cu)}")
        if cu.device != q.device:
            raise RuntimeError(f"{fn}: {name} must be on the device of q ({q.device}), got {cu.device}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"{fn}: cu_seqlens_q and cu_seqlens_k must have the same length (B + 1), got "
                         f"{cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}")
    max_seqlen_q, max_seqlen_k = _index(max_seqlen_q), _index(max_seqlen_k)
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if not _is_int(m):
            raise TypeError(f"{fn}: {name} must be a non-negative int (or a 0-d integer tensor), got {m!r}")
        if isinstance(m, torch.SymInt) or torch.compiler.is_compiling():
            # checked as the graph runs (e.g. lengths.max().item(): a comparison guards on the data;
            # dynamo shows SymInts as ints); no message under strict torch.export, which took the
            # message function for a tensor input
            msg = None if torch.compiler.is_exporting() else _max_seqlen_range_message
            torch._check(m >= 0, msg)
            torch._check(m <= _INT32_MAX, msg)
        elif m < 0:
            raise ValueError(f"{fn}: {name} must be a non-negative int (or a 0-d integer tensor), got {m!r}")
        elif m > _INT32_MAX:
            raise ValueError(f"{fn}: {name} must be at most 2**31 - 1 (lengths are int32, as cu_seqlens), got {m}")
    for name, cu, total, mx in (("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q),
                                ("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k)):
        if not _readable(cu):
            break  # values are data: the op checks CPU ones when it runs, the CUDA kernels clamp theirs
        c = cu.tolist()
        if c[0] != 0:
            raise ValueError(f"{fn}: {name} must start at 0, got {c[0]}")
        lengths = [b - a for a, b in zip(c, c[1:])]
        if any(n < 0 for n in lengths):
            raise ValueError(f"{fn}: {name} must be non-decreasing, got {c}")
        if c[-1] > total:
            raise ValueError(f"{fn}: the last entry of {name} must be at most the number of tokens ({total}), "
                             f"got {c[-1]}")
        if lengths and max(lengths) > mx:
            raise ValueError(f"{fn}: max_seqlen_{name[-1]} {mx} is smaller than the longest sequence "
                             f"({max(lengths)}) of {name}")
    scale, left, right, softcap, slopes = _check_options(fn, q, cu_seqlens_q.numel() - 1, causal, return_lse,
                                                         deterministic, scale, window, softcap, alibi_slopes)
    dropout_p = _check_dropout(fn, dropout_p, generator, return_dropout_mask, q.device)
    rng_state = _rng_state(q, max_seqlen_k, dropout_p, generator, (k, v, cu_seqlens_q, cu_seqlens_k, slopes))
    out, lse = ops.varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal,
                              deterministic or torch.are_deterministic_algorithms_enabled(), left, right, softcap,
                              slopes, dropout_p, rng_state)
    result = (out, lse) if return_lse else (out,)
    if return_dropout_mask:
        shape = (cu_seqlens_q.numel() - 1, q.shape[1], max_seqlen_q, max_seqlen_k)
        result += (_dropout_mask(fn, rng_state, dropout_p, shape, q.device, cu_seqlens_q, cu_seqlens_k),)
    return result if len(result) > 1 else out


def _kvcache_checked_by_op(q, k_cache, v_cache, k, v, cache_seqlens, block_table, causal, scale, num_splits,
                           cache_leftpad):
    """attention_with_kvcache's common CPU call (no window, softcap or ALiBi) straight to the op, or
    None when it takes the checked path. Decoding calls it once per token and layer, and each call
    reads the whole cache: the Python checks then run on an evicted cache and took 50-65 us a step
    (of ~500 at 2k keys, B = 1, 8 kv heads; README "KV cache"). The op checks every shape, dtype,
    device and CPU value the backend relies on before it writes the cache (csrc/ops.cpp
    check_kvcache, kvcache_lengths); when it refuses, the caller's checks run and say exactly what
    is wrong. CUDA calls take it too: the op checks what the Python checks do there (neither reads
    CUDA values, which would synchronise), and a step's fixed cost is what a GPU waits for at small
    batches. Not inside flash_cuda.emulate(), whose kernels do not check the values of
    cache_seqlens, cache_leftpad and block_table (the Python checks do, on CPU tensors), nor for tensor
    subclasses (fake tensors run the op's fake function, which checks devices only)."""
    try:
        if (type(q) is not torch.Tensor or q.device.type not in ("cpu", "cuda") or emulate._current is not None
                or torch.compiler.is_compiling()):
            return None
        if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (q, k_cache, v_cache, k, v)):
            return None  # the checked path raises
        if type(num_splits) is not int or not (scale is None or type(scale) is float and abs(scale) <= _F32_MAX):
            return None
        if cache_seqlens is None:  # the whole capacity (the checked path refuses it with k and v)
            if k is not None or v is not None:
                return None
            cache_seqlens = k_cache.shape[2] if block_table is None else block_table.shape[1] * k_cache.shape[2]
        if type(cache_seqlens) is int:
            if not 0 <= cache_seqlens <= _INT32_MAX:
                return None
            cache_seqlens = torch.full((q.shape[0],), cache_seqlens, dtype=torch.int32, device=q.device)
        elif not isinstance(cache_seqlens, torch.Tensor):
            return None
        if cache_leftpad is not None and type(cache_leftpad) is not torch.Tensor:
            return None
        return _kvcache_fwd(q, k_cache, v_cache, k, v, cache_seqlens, block_table,
                            1.0 / math.sqrt(q.shape[-1]) if scale is None else scale, causal, -1, -1, 0.0, None,
                            num_splits, cache_leftpad)
    except Exception:  # noqa: BLE001 (any refusal: the checked path names the argument)
        return None


_kvcache_fwd = torch.ops.flash_cuda.kvcache_fwd.default


def attention_with_kvcache(q, k_cache, v_cache, k=None, v=None, *, cache_seqlens=None, block_table=None,
                           causal=False, scale=None, window=None, softcap=0.0, alibi_slopes=None, num_splits=0,
                           return_lse=False, cache_leftpad=None):
    """Attention of new queries to a KV cache, appending new keys and values in place (inference).

    q: (B, Hq, Nq, D). The cache, in either layout (any strides with stride(-1) == 1, so
    FlashAttention's and vLLM's (..., N, Hkv, D) caches are passed as .transpose(-3, -2) views):
      contiguous: k_cache, v_cache (B, Hkv, capacity, D);
      paged: k_cache, v_cache (num_pages, Hkv, page_size, D), a pool of pages, and block_table
        int32 (B, pages per sequence): key n of sequence b is row n % page_size of page
        block_table[b, n // page_size] (any page size; capacity = pages per sequence x page_size).
    cache_seqlens: int32 (B,) tensor or an int for all: keys already in each sequence's cache
        (None: the whole capacity, without k and v). k, v: (B, Hkv, Nnew, D) or None: written into the cache in
        place at positions cache_seqlens[b] .. + Nnew (through block_table when paged); attention
        then covers the first cache_seqlens[b] + Nnew keys of sequence b and nothing after them.
        cache_seqlens itself is not updated (add Nnew for the next step). With k and v, no two
        positions of k_cache and v_cache may share memory (no expanded views).
    causal: bottom-right aligned to each sequence's keys (query i of Nq sees keys up to
        cache_seqlens[b] + Nnew - Nq + i), so prefill chunks and multi-token (speculative)
        steps work. scale, window, softcap, alibi_slopes: as in attention().
    cache_leftpad: int32 (B,) tensor or None (FlashAttention-2's cache_leftpad, which it takes
        with contiguous caches only; here paged ones too): sequence b's keys start at row
        cache_leftpad[b] of its cache, a batch of left-padded prompts cached as they are.
        cache_seqlens[b] still counts from row 0 (the append goes to rows cache_seqlens[b] ..),
        so sequence b attends to rows cache_leftpad[b] .. cache_seqlens[b] + Nnew - 1 and nothing
        before them, and causal, window and ALiBi count positions from its first key. Each entry
        in [0, cache_seqlens[b]].
    num_splits: key splits per query tile (Flash-Decoding), at most 128: 0 picks them from the
        shapes and the device (README "KV cache"), 1 disables splitting; results differ between
        split counts by the rounding of P (each split rounds it to fp16/bf16 against its own
        running max) and of the fp32 merge, each within FlashAttention's rule. The CPU backend
        takes at most one split per 512-key tile.
    Inference only: no autograd (a RuntimeError if an input requires grad while grad is
    enabled). fp16/bf16 on CUDA and in flash_cuda.emulate() (a cache head dim that is a multiple
    of 8); every dtype on CPU.

    Returns out (B, Hq, Nq, D), and with return_lse also lse (B, Hq, Nq). The values of CPU
    cache_seqlens, cache_leftpad and block_table are checked; CUDA ones are not (that would
    synchronise with the GPU): the kernels clamp them, so wrong ones give wrong values, never an
    illegal access.
    """
    ops.refuse_forward_ad("flash_cuda.attention_with_kvcache", ("q", "k_cache", "v_cache", "k", "v", "alibi_slopes"),
                          (q, k_cache, v_cache, k, v, alibi_slopes))
    if (window is None and alibi_slopes is None and type(softcap) is float and softcap == 0.0
            and (causal is False or causal is True) and (return_lse is False or return_lse is True)):
        result = _kvcache_checked_by_op(q, k_cache, v_cache, k, v, cache_seqlens, block_table, causal, scale,
                                        num_splits, cache_leftpad)
        if result is not None:
            return result if return_lse else result[0]
    fn = "flash_cuda.attention_with_kvcache"
    _check_tensors(fn, ("q", "k_cache", "v_cache"), (q, k_cache, v_cache))
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if x.dim() != 4:
            raise ValueError(f"{fn}: {name} must be 4-D, got shape {_shape(x)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"{fn}: v_cache must have the shape of k_cache {_shape(k_cache)}, got {_shape(v_cache)}")
    if not torch.compiler.is_compiling() and any(torch._is_functional_tensor(x) for x in (k_cache, v_cache)):
        # torch.func.functionalize has no rule for a custom op that writes its inputs in place
        # (torch.compile has: its graphs functionalize the append)
        raise NotImplementedError(f"{fn}: k_cache and v_cache are written in place, which torch.func.functionalize "
                                  "does not support for custom ops; call it under torch.compile, which "
                                  "functionalizes the append, or outside functionalize")
    B, hq, nq, d = q.shape
    paged = block_table is not None
    if paged:
        if not isinstance(block_table, torch.Tensor):
            raise TypeError(f"{fn}: block_table must be a torch.Tensor or None, got {_type_name(block_table)}")
        _check_dense(fn, "block_table", block_table)
        if block_table.dtype != torch.int32:
            raise TypeError(f"{fn}: block_table must be int32, got {block_table.dtype}")
        if block_table.dim() != 2 or block_table.shape[0] != B:
            raise ValueError(f"{fn}: block_table must be (B, pages per sequence) = ({B}, ...), got "
                             f"{_shape(block_table)}")
        if block_table.device != q.device:
            raise RuntimeError(f"{fn}: block_table must be on the device of q ({q.device}), got {block_table.device}")
        if k_cache.shape[0] < 1 or k_cache.shape[2] < 1:
            raise ValueError(f"{fn}: a paged k_cache (num_pages, Hkv, page_size, D) needs at least one page of at "
                             f"least one key, got {_shape(k_cache)}")
        capacity = block_table.shape[1] * k_cache.shape[2]
    else:
        if k_cache.shape[0] != B:
            raise ValueError(f"{fn}: k_cache must be (B, Hkv, capacity, D) with the batch size of q ({B}), got "
                             f"{_shape(k_cache)} (a paged cache needs block_table)")
        capacity = k_cache.shape[2]
    hkv = k_cache.shape[1]
    if k_cache.shape[3] != d:
        raise ValueError(f"{fn}: k_cache must have the head dim of q ({d}), got {_shape(k_cache)}")
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
        if x.shape[3] > 1 and x.stride(3) != 1:
            raise ValueError(f"{fn}: {name} must have unit stride in the head dim (stride(-1) == 1: the cache is "
                             f"read and appended to in place, never copied), got strides {tuple(x.stride())}")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"{fn}: the number of query heads ({hq}) must be a multiple of the number of "
                         f"key/value heads ({hkv}){', at least 1' if hkv == 0 else ''}")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"{fn}: head dim D (last dim of q) must be in [1, {MAX_HEAD_DIM}], got {d}")
    if (k is None) != (v is None):
        raise ValueError(f"{fn}: k and v (the new keys and values) must be given together or both be None")
    n_new = 0
    if k is not None:
        _check_tensors(fn, ("q", "k", "v"), (q, k, v))
        for name, x in (("k", k), ("v", v)):
            if x.dim() != 4 or x.shape[0] != B or x.shape[1] != hkv or x.shape[3] != d:
                raise ValueError(f"{fn}: {name} must be (B, Hkv, Nnew, D) = ({B}, {hkv}, Nnew, {d}), got "
                                 f"{_shape(x)}")
        if v.shape != k.shape:
            raise ValueError(f"{fn}: v must have the shape of k {_shape(k)}, got {_shape(v)}")
        n_new = k.shape[2]
    cache_seqlens = _cache_seqlens(fn, cache_seqlens, B, capacity, n_new, q.device)
    if cache_leftpad is not None:
        _check_int32_rows(fn, "cache_leftpad", cache_leftpad, B, q.device)
    num_splits = _plain(num_splits)
    if not _is_int(num_splits):
        raise TypeError(f"{fn}: num_splits must be an int in [0, {MAX_NUM_SPLITS}] (0: chosen for the device, "
                        f"1: no split), got {_type_name(num_splits)}")
    if not 0 <= num_splits <= MAX_NUM_SPLITS:
        raise ValueError(f"{fn}: num_splits must be an int in [0, {MAX_NUM_SPLITS}] (0: chosen for the device, "
                         f"1: no split), got {num_splits!r}")
    scale, left, right, softcap, slopes = _check_options(fn, q, B, causal, return_lse, False, scale, window, softcap,
                                                         alibi_slopes)
    if torch.is_grad_enabled():
        for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("k", k), ("v", v)):
            if x is not None and x.requires_grad:
                raise RuntimeError(f"{fn}: {name} requires grad, but attention_with_kvcache is inference only (no "
                                   "autograd); call it under torch.no_grad() / torch.inference_mode() or pass "
                                   "detached tensors")
    if _readable(cache_seqlens):
        _check_cache_seqlens(fn, cache_seqlens, capacity, n_new)
        if cache_leftpad is not None:
            _check_cache_leftpad_values(fn, cache_leftpad, cache_seqlens)
        if paged:
            _check_pages(fn, block_table, cache_seqlens, n_new, k_cache.shape[2], k_cache.shape[0], cache_leftpad)
    try:
        out, lse = torch.ops.flash_cuda.kvcache_fwd(q, k_cache, v_cache, k, v, cache_seqlens, block_table, scale,
                                                    causal, left, right, softcap, slopes, num_splits, cache_leftpad)
    except ValueError as err:  # the op's checks of the memory the append writes (csrc/ops.cpp), in fn's name
        raise ValueError(str(err).replace("flash_cuda: ", f"{fn}: ", 1)) from None
    return (out, lse) if return_lse else out


def _cache_seqlens(fn, cache_seqlens, B, capacity, n_new, device):
    """attention_with_kvcache's cache_seqlens (an int, an int32 (B,) tensor or None: the whole
    capacity, without new keys) as the int32 (B,) tensor on `device` the kernels read."""
    if cache_seqlens is None:
        if n_new:
            raise ValueError(f"{fn}: cache_seqlens is required when k and v are given (where to append them)")
        cache_seqlens = capacity
    cache_seqlens = _plain(cache_seqlens)
    if _is_int(cache_seqlens):
        if not 0 <= cache_seqlens <= _INT32_MAX:
            raise ValueError(f"{fn}: cache_seqlens must be in [0, {capacity - n_new}] for a cache of {capacity} keys "
                             f"per sequence, got {cache_seqlens}")
        cache_seqlens = torch.full((B,), cache_seqlens, dtype=torch.int32, device=device)
    _check_int32_rows(fn, "cache_seqlens", cache_seqlens, B, device, "an int32 tensor (B,), an int or None")
    return cache_seqlens


def _check_int32_rows(fn, name, x, B, device, what="an int32 tensor (B,) or None", rows="B"):
    """A per-sequence int32 argument (cache_seqlens, cache_leftpad; the drop-in's indices): a dense
    int32 tensor of shape (B,) on q's device; `what` names what the argument may be, `rows` the
    caller's name for B."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be {what}, got {_type_name(x)}")
    _check_dense(fn, name, x)
    if x.dtype != torch.int32:
        raise TypeError(f"{fn}: {name} must be int32, got {x.dtype}")
    if _shape(x) != (B,):
        raise ValueError(f"{fn}: {name} must have shape ({rows},) = ({B},), got {_shape(x)}")
    if x.device != device:
        raise RuntimeError(f"{fn}: {name} must be on the device of q ({device}), got {x.device}")


def _check_cache_leftpad_values(fn, cache_leftpad, cache_seqlens):
    """The values of readable (CPU) cache_leftpad: each sequence's first row within its length."""
    bad = ((cache_leftpad < 0) | (cache_leftpad > cache_seqlens)).nonzero()
    if bad.numel():
        b = bad[0, 0].item()
        raise ValueError(f"{fn}: cache_leftpad[{b}] = {cache_leftpad[b].item()} is out of range: it must be in "
                         f"[0, cache_seqlens[{b}] = {cache_seqlens[b].item()}] (sequence {b}'s keys are cache rows "
                         f"cache_leftpad[{b}] .. cache_seqlens[{b}] + Nnew - 1)")


def _check_cache_seqlens(fn, cache_seqlens, capacity, n_new):
    """The values of readable (CPU) cache_seqlens: each sequence's keys and its new ones fit the cache."""
    for b, n in enumerate(cache_seqlens.tolist()):
        if not 0 <= n <= capacity - n_new:
            room = f" with room for the {n_new} new keys" if n_new else ""
            raise ValueError(f"{fn}: cache_seqlens[{b}] = {n} is out of range: it must be in "
                             f"[0, {capacity - n_new}] for a cache of {capacity} keys per sequence{room}")


def _check_pages(fn, block_table, cache_seqlens, n_new, page_size, num_pages, cache_leftpad=None):
    """CPU values of a paged call (tensor ops: a Python loop over B x pages took 160 us at 8 x 256):
    every entry a sequence uses (rows cache_leftpad[b] (0 without it) .. cache_seqlens[b] + Nnew;
    pages only a left pad covers are never read) inside the pool, and no page the new keys are
    written into reached by another used entry, of the same sequence or another (the append would
    overwrite keys in use; on a GPU, race). Pages only read may be shared (a common prefix). Each
    message names the first offending entry in row-major order."""
    table = block_table.long()
    entries = torch.arange(table.shape[1])
    lengths = cache_seqlens.long()[:, None]
    used = entries * page_size < lengths + n_new  # (B, pages per sequence)
    if cache_leftpad is not None:
        used &= (entries + 1) * page_size > cache_leftpad.long()[:, None]
    outside = used & ((table < 0) | (table >= num_pages))
    if outside.any():
        b, i = outside.nonzero()[0].tolist()
        raise ValueError(f"{fn}: block_table[{b}, {i}] = {table[b, i]} points outside the pool of {num_pages} "
                         f"pages (k_cache.shape[0]) but sequence {b} uses that page")
    if not n_new:
        return
    written = used & ((entries + 1) * page_size > lengths)
    uses = torch.bincount(table[used], minlength=num_pages)
    shared_written = torch.zeros(num_pages, dtype=torch.bool)
    shared_written[table[written]] = True
    shared_written &= uses > 1
    clash = used & shared_written[table.clamp(0, num_pages - 1)]
    if clash.any():
        b, i = clash.nonzero()[0].tolist()
        page = table[b, i].item()
        # another entry of the page (there is one: it is used twice), and a writer of it: this
        # entry itself when it takes new keys (the first clash can be the writer: a StopIteration
        # when only other writers were searched)
        ob, oi = next(e for e in (used & (table == page)).nonzero().tolist() if e != [b, i])
        wb = b if written[b, i] else next(e for e in (written & (table == page)).nonzero().tolist())[0]
        raise ValueError(f"{fn}: block_table[{b}, {i}] = {page} is also block_table[{ob}, {oi}], a page that "
                         f"sequence {wb}'s new keys are written into: the append would overwrite keys in use; give "
                         "every page that takes new keys to one entry of the table (padding rows of a batch "
                         "included)")


def unpad_input(x, attention_mask):
    """A padded batch x (B, S, ...) and its (B, S) mask (bool, int or 0/1 float; nonzero = a real token) ->
    (x_unpad (total, ...), indices (total,) int64 into the flattened B * S tokens, cu_seqlens
    (B + 1,) int32, max_seqlen int), for varlen_attention. Differentiable in x."""
    return _unpad("flash_cuda.unpad_input", x, attention_mask, None, ("x", "attention_mask"))[:4]


def _check_padding_mask(fn, mask, name, x, x_name):
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {_type_name(mask)}")
    _check_dense(fn, name, mask)
    if mask.dim() != 2 or x.dim() < 2 or tuple(x.shape[:2]) != tuple(mask.shape):
        raise ValueError(f"{fn}: {name} must be (B, S) matching {x_name}'s first two dims, got {_shape(mask)} "
                         f"for {x_name} of shape {_shape(x)}")
    if mask.device != x.device:
        raise RuntimeError(f"{fn}: {name} must be on {x_name}'s device ({x.device}), got {mask.device}")
    # a floating mask of 0s and 1s is a padding mask; an additive one (0 = keep, -inf = hidden)
    # would be read the other way round (nonzero = a real token)
    if mask.is_floating_point():
        msg = (f"{fn}: {name} must be a padding mask (bool, or 1 = a real token and 0 = padding), got a floating "
               "mask with values other than 0 and 1 (an additive mask?)")
        zero_one = ((mask == 0) | (mask == 1)).all()
        if torch.compiler.is_compiling() and mask.device.type == "cpu":
            # checked as the graph runs (a host read broke the graph); not on a GPU, where
            # Inductor's device assert is off outside debug builds
            torch._assert_async(zero_one, msg)
        elif not bool(zero_one):
            raise ValueError(msg)
    return mask != 0


def _unpad(fn, x, attention_mask, unused_mask, names):
    """unpad_input, and FlashAttention's (flash_cuda.bert_padding) with unused_mask: the tokens
    kept are those of either mask; -> (x_unpad, indices, cu_seqlens, max_seqlen, the lengths
    (B,) int32 of attention_mask alone)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: {names[0]} must be a torch.Tensor, got {_type_name(x)}")
    _check_dense(fn, names[0], x)
    used = _check_padding_mask(fn, attention_mask, names[1], x, names[0])
    keep = used if unused_mask is None else used | _check_padding_mask(fn, unused_mask, "unused_mask", x, names[0])
    indices = torch.nonzero(keep.reshape(-1)).flatten()
    lengths = keep.sum(1, dtype=torch.int32)
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
    max_seqlen = int(lengths.max().item()) if lengths.numel() else 0
    return (x.reshape(-1, *x.shape[2:])[indices], indices, cu_seqlens, max_seqlen,
            lengths if unused_mask is None else used.sum(1, dtype=torch.int32))


def pad_input(x_unpad, indices, batch, seqlen):
    """Inverse of unpad_input: (total, ...) -> (batch, seqlen, ...) with zeros at the padding.
    Differentiable in x_unpad. The values of CPU indices are checked (each in [0, batch * seqlen));
    CUDA ones are not (that would synchronise with the GPU)."""
    return _pad("flash_cuda.pad_input", x_unpad, indices, batch, seqlen, "x_unpad")


def _check_index_range(fn, indices, n, what, distinct=False):
    """Each index in [0, n) (what: n's name), and with `distinct` no index twice (rows written
    at the indices: a repeated one kept one of its rows, which torch leaves unspecified, and
    dropped the others), where CPU indices can be read without a sync; CUDA ones are not read
    (that would synchronise with the GPU). Compiled on the CPU, the range is checked as the graph
    runs (Inductor's own bounds check would fail there too, without naming indices); repeats
    are not checked there."""
    if _readable(indices) and indices.numel():
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= n:
            raise ValueError(f"{fn}: indices must be in [0, {what}) = [0, {n}), got values in [{lo}, {hi}]")
        # unpad_input's indices increase: one pass; others are counted by a sort
        if distinct and not bool((indices[1:] > indices[:-1]).all()):
            repeated = indices.numel() - torch.unique(indices).numel()
            if repeated:
                raise ValueError(f"{fn}: indices must be distinct (each names the row one value is written to), "
                                 f"got {repeated} repeated")
    elif torch.compiler.is_compiling() and indices.device.type == "cpu":
        # (n not shown: dynamo shows a symbolic size as an int, and formatting it specialises it)
        torch._assert_async(((indices >= 0) & (indices < n)).all(), f"{fn}: indices must be in [0, {what})")


def _pad(fn, x_unpad, indices, batch, seqlen, x_name):
    if not isinstance(x_unpad, torch.Tensor) or not isinstance(indices, torch.Tensor):
        raise TypeError(f"{fn}: {x_name} and indices must be torch.Tensors, got {_type_name(x_unpad)} and "
                        f"{_type_name(indices)}")
    _check_dense(fn, x_name, x_unpad)
    _check_dense(fn, "indices", indices)
    batch, seqlen = _index(batch), _index(seqlen)
    for name, n in (("batch", batch), ("seqlen", seqlen)):
        if not _is_int(n):
            raise TypeError(f"{fn}: {name} must be a non-negative int, got {n!r}")
        if n < 0:
            raise ValueError(f"{fn}: {name} must be a non-negative int, got {n}")
    if batch * seqlen > _INT64_MAX:
        raise ValueError(f"{fn}: batch * seqlen must be at most 2**63 - 1 (the padded output's rows), got "
                         f"{_number(batch)} * {_number(seqlen)}")
    if x_unpad.dim() < 1:
        raise ValueError(f"{fn}: {x_name} must be (total, ...), got a 0-d tensor")
    if indices.dtype != torch.int64 or indices.dim() != 1 or indices.shape[0] != x_unpad.shape[0]:
        raise ValueError(f"{fn}: indices must be int64 (total,) = ({x_unpad.shape[0]},) as unpad_input returns "
                         f"them, got {indices.dtype} of shape {_shape(indices)}")
    if indices.device != x_unpad.device:
        raise RuntimeError(f"{fn}: indices must be on the device of {x_name} ({x_unpad.device}), got {indices.device}")
    _check_index_range(fn, indices, batch * seqlen, "batch * seqlen", distinct=True)
    shape = (batch * seqlen, *x_unpad.shape[1:])
    try:
        out = x_unpad.new_zeros(shape)
    except RuntimeError as err:
        raise _unallocatable(fn, "the padded output (batch * seqlen, ...)", shape, x_unpad.element_size(), err) from err
    out = out.index_put((indices,), x_unpad)
    return out.reshape(batch, seqlen, *x_unpad.shape[1:])
