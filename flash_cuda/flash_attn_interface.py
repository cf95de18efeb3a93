"""FlashAttention-2's Python interface (`flash_attn.flash_attn_interface`, v2.6+) on flash_cuda, so
that code written for FlashAttention-2 switches with one import:

    from flash_cuda.flash_attn_interface import flash_attn_func, flash_attn_varlen_func

Same signatures, argument order and defaults, same layouts: q (B, Nq, H, D), k and v (B, Nk, Hkv, D);
packed qkv (B, N, 3, H, D) and kv (B, Nk, 2, Hkv, D); varlen q (total_q, H, D) with cu_seqlens int32.
The (B, N, H, D) tensors reach flash_cuda.attention as transposed views (no copy) and the output is
(B, Nq, H, D) in q's memory layout, as FlashAttention's (its forward allocates torch.empty_like(q));
packed tensors are split into views, so the gradients of qkv/kv are written into one tensor by
autograd. Causal masks and windows are bottom-right aligned, ALiBi is -slope |i + Nk - Nq - j|, as
in FlashAttention-2 >= 2.1.

Every argument is honoured or rejected with an exception naming it:
- return_attn_probs=True returns (out, softmax_lse, S_dmask). softmax_lse is FlashAttention's
  ((B, H, Nq) float32; varlen (H, total_q)) but in rows that see no key, where it is -inf (the log
  of an empty sum; FlashAttention-2's kernels write +inf there). With dropout S_dmask is
  (B, H, Nq, Nk) (varlen: (B, H, max_seqlen_q, max_seqlen_k)) float32 in FlashAttention's sign
  convention for the dropout pattern, +1 where kept and -1 where dropped: flash_cuda does not
  materialise probabilities (FlashAttention documents its S_dmask as "for testing only, not
  guaranteed to have the right scaling"); use flash_cuda.attention(return_dropout_mask=True) for
  the boolean mask. Without dropout S_dmask is an empty tensor (shape (0,), q's dtype and device)
  and nothing is materialised, as in FlashAttention 2.7+ (2.6 returned None there): callers that
  want only softmax_lse, e.g. to merge blocks, pay nothing more.
- flash_attn_with_kvcache runs flash_cuda.attention_with_kvcache (in-place append, paged caches,
  split-KV); its rotary_cos/rotary_sin (applied to q and k before the call), cache_batch_idx (a
  paged call on the same memory) and cache_leftpad as in FlashAttention-2, see its docstring.
  flash_attn_varlen_func's block_table (paged keys for packed sequences) gathers the keys into
  packed tensors before the call (a copy).
- Arguments are read as FlashAttention's bindings read them: flags also as numpy bools or ints
  (return_attn_probs by its truth), any negative window_size entry as unbounded, a softcap <= 0 as
  none ("anything > 0 activates softcapping"; NaN, which FlashAttention reads as none too, and +inf
  are refused), softmax_scale also as a 0-d tensor, alibi_slopes that require grad as constants;
  flash_attn_with_kvcache has no autograd and reads tensors that require grad as constants, as
  FlashAttention's.
FlashAttention's autograd Function classes (FlashAttnFunc, FlashAttnVarlenFunc, ...) are not
provided: their apply() arguments are internal and change between its releases; call the functions.
Errors from flash_cuda's checks name the function called and its argument (softmax_scale, qkv, kv,
cu_seqlens, max_seqlen) where they name one of flash_cuda's.
"""
import re

import torch

from .api import (_INT32_MAX, _cache_seqlens, _check_cache_seqlens, _check_int32_rows, _check_window, _index, _is_int,
                  _plain, _readable, _shape, _type_name, attention, attention_with_kvcache, varlen_attention)


def _window(fn, window_size, seqlen_k):
    """FlashAttention's window_size as FlashAttention-2's bindings hand it to the kernels, with
    seqlen_k the keys' length (max_seqlen_k in varlen calls, the cache's capacity in kvcache
    ones): a negative entry is unbounded, so is an entry of at least seqlen_k, and then a window
    bounded on the left alone gets the right bound seqlen_k. Both matter where queries outnumber
    keys by more than the bound: with 2 keys and 4 queries, query 0 sees key 1 under (-1, 2) (the
    window's formula, key j <= i + Nk - Nq + 2, would hide it) and does not under (1, -1)."""
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(_is_int(_plain(w)) for w in window_size)):
        raise TypeError(f"{fn}: window_size must be a pair of ints (left, right), -1 = infinite, got {window_size!r}")
    window = _check_window(fn, tuple(torch.sym_max(_plain(w), -1) for w in window_size), "window_size")
    if window == (-1, -1):  # no window: nothing to compare (seqlen_k may be data-dependent, a 0-d tensor
        return None         # read under torch.export, where a comparison raised: a review)
    if _is_int(seqlen_k):
        left, right = (-1 if w >= seqlen_k else w for w in window)
        window = (left, seqlen_k if left >= 0 and right < 0 else right)
    return None if window == (-1, -1) else window


def _flag(fn, name, value):
    """A bool argument as FlashAttention's bindings take it: a bool, numpy bool or int."""
    if isinstance(_plain(value), int) or _type_name(value) in ("numpy.bool", "numpy.bool_"):
        return bool(value)
    raise TypeError(f"{fn}: {name} must be a bool, got {_type_name(value)}")


def _softcap(softcap):
    """FlashAttention's softcap: any value <= 0 (-inf too) turns it off (its bindings test
    softcap > 0), so a negative one runs as 0.0 here, where flash_cuda.attention refuses it. NaN
    (off in FlashAttention), +inf and non-numbers go on to flash_cuda's check, which refuses them
    by name."""
    value = _plain(softcap)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
        return 0.0
    return softcap


def _no_s_dmask(q):
    """S_dmask without dropout: FlashAttention 2.7+ returns an empty tensor of q's dtype and device."""
    return torch.empty((0,), dtype=q.dtype, device=q.device)


def _options(fn, softmax_scale, causal, deterministic, alibi_slopes):
    """The arguments every function shares, as FlashAttention takes them: softmax_scale also a 0-d
    tensor (its bindings read it as a float); bool flags also numpy bools or ints; alibi_slopes
    that require grad read as constants (FlashAttention returns no gradient for them)."""
    if isinstance(softmax_scale, torch.Tensor) and softmax_scale.dim() == 0 and softmax_scale.dtype.is_floating_point:
        softmax_scale = float(softmax_scale)
    if isinstance(alibi_slopes, torch.Tensor):
        alibi_slopes = alibi_slopes.detach()
    return softmax_scale, _flag(fn, "causal", causal), _flag(fn, "deterministic", deterministic), alibi_slopes


_CHECKED = (TypeError, ValueError, RuntimeError, NotImplementedError)


def _in_callers_terms(fn, err, renames):
    """An error of flash_cuda's checks ("flash_cuda.attention: scale must be ...") as one of fn's
    ("flash_attn_func: softmax_scale must be ..."); any other as it is. Names of one letter are
    renamed where they lead the message and in the head dim's "(last dim of q)"."""
    found = re.match(r"flash_cuda(?:\.\w+)?: (\w+)(.*)", str(err), re.S) if type(err) in _CHECKED else None
    if found is None:
        return err
    rest = found[2]
    for name, callers in renames.items():  # (names of several letters anywhere; q, k, v where they lead)
        if len(name) > 1:
            rest = re.sub(rf"\b{name}\b", callers, rest)
        else:  # the head dim's "(last dim of q)"
            rest = rest.replace(f"(last dim of {name})", f"(last dim of {callers})")
    return type(err)(f"{fn}: {renames.get(found[1], found[1])}{rest}")


_SCALE = {"scale": "softmax_scale"}


def _check_dims(fn, named, dims, layout):
    for name, x in named:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != dims:
            raise ValueError(f"{fn}: {name} must be {dims}-D {layout[name]}, got shape {_shape(x)}")


def _s_dmask(keep):
    """FlashAttention's sign convention for the dropout pattern: +1 kept, -1 dropped."""
    return keep.to(torch.float32) * 2 - 1


def _with_mask(return_attn_probs, dropout_p):
    """Whether S_dmask is made: with dropout only, as FlashAttention's return_softmax (a bad
    dropout_p counts as dropout, so that flash_cuda's check names it)."""
    return return_attn_probs and _plain(dropout_p) != 0


def _dense(fn, q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
           return_attn_probs, renames=_SCALE):
    """q (B, Nq, H, D), k and v (B, Nk, Hkv, D): flash_cuda.attention on (B, H, N, D) views."""
    window = _window(fn, window_size, k.shape[1])
    softmax_scale, causal, deterministic, alibi_slopes = _options(fn, softmax_scale, causal, deterministic, alibi_slopes)
    return_attn_probs = bool(return_attn_probs)  # (FlashAttention tests only its truth)
    with_mask = _with_mask(return_attn_probs, dropout_p)
    for name, x, other in (("k", k, q), ("v", v, k)):
        if x.shape[0] != other.shape[0] or x.shape[3] != q.shape[3] or (name == "v" and x.shape != k.shape):
            raise ValueError(f"{fn}: {name} must be (batch, seqlen_k, nheads_k, headdim) matching q "
                             f"{_shape(q)} and k, got {_shape(x)}")
    try:
        result = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal,
                           scale=softmax_scale, window=window, softcap=_softcap(softcap),
                           alibi_slopes=alibi_slopes, dropout_p=dropout_p, return_lse=return_attn_probs,
                           return_dropout_mask=with_mask, deterministic=deterministic)
    except _CHECKED as err:
        raise _in_callers_terms(fn, err, renames) from None
    if return_attn_probs:
        out, lse, *keep = result
        return out.transpose(1, 2), lse, _s_dmask(keep[0]) if with_mask else _no_s_dmask(q)
    return result.transpose(1, 2)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads_k, headdim), nheads a
    multiple of nheads_k. Returns out (batch, seqlen_q, nheads, headdim) [, softmax_lse, S_dmask]."""
    fn = "flash_attn_func"
    _check_dims(fn, (("q", q), ("k", k), ("v", v)), 4, {"q": "(batch, seqlen_q, nheads, headdim)",
                                                          "k": "(batch, seqlen_k, nheads_k, headdim)",
                                                          "v": "(batch, seqlen_k, nheads_k, headdim)"})
    return _dense(fn, q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                  return_attn_probs)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """qkv: (batch, seqlen, 3, nheads, headdim)."""
    fn = "flash_attn_qkvpacked_func"
    _check_dims(fn, (("qkv", qkv),), 5, {"qkv": "(batch, seqlen, 3, nheads, headdim)"})
    if qkv.shape[2] != 3:
        raise ValueError(f"{fn}: qkv must be (batch, seqlen, 3, nheads, headdim), got {_shape(qkv)}")
    return _dense(fn, qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p, softmax_scale, causal, window_size, softcap,
                  alibi_slopes, deterministic, return_attn_probs, dict(_SCALE, q="qkv", k="qkv", v="qkv"))


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q: (batch, seqlen_q, nheads, headdim); kv: (batch, seqlen_k, 2, nheads_k, headdim)."""
    fn = "flash_attn_kvpacked_func"
    _check_dims(fn, (("q", q),), 4, {"q": "(batch, seqlen_q, nheads, headdim)"})
    _check_dims(fn, (("kv", kv),), 5, {"kv": "(batch, seqlen_k, 2, nheads_k, headdim)"})
    if kv.shape[2] != 2:
        raise ValueError(f"{fn}: kv must be (batch, seqlen_k, 2, nheads_k, headdim), got {_shape(kv)}")
    return _dense(fn, q, kv[:, :, 0], kv[:, :, 1], dropout_p, softmax_scale, causal, window_size, softcap,
                  alibi_slopes, deterministic, return_attn_probs, dict(_SCALE, k="kv", v="kv"))


def _varlen(fn, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
            window_size, softcap, alibi_slopes, deterministic, return_attn_probs, renames=_SCALE):
    max_seqlen_k = _index(max_seqlen_k)  # (read once: a 0-d tensor's item() under export is a new symbol each time)
    window = _window(fn, window_size, max_seqlen_k)
    softmax_scale, causal, deterministic, alibi_slopes = _options(fn, softmax_scale, causal, deterministic, alibi_slopes)
    return_attn_probs = bool(return_attn_probs)
    with_mask = _with_mask(return_attn_probs, dropout_p)
    try:
        result = varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
                                  scale=softmax_scale, window=window, softcap=_softcap(softcap),
                                  alibi_slopes=alibi_slopes, dropout_p=dropout_p, return_lse=return_attn_probs,
                                  return_dropout_mask=with_mask, deterministic=deterministic)
    except _CHECKED as err:
        raise _in_callers_terms(fn, err, renames) from None
    if not return_attn_probs:
        return result
    out, lse, *keep = result
    return out, lse, _s_dmask(keep[0]) if with_mask else _no_s_dmask(q)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """q: (total_q, nheads, headdim); k, v: (total_k, nheads_k, headdim); cu_seqlens int32 (batch + 1,).
    With block_table int32 (batch, max_blocks), as FlashAttention-2's: k and v are a paged pool
    (num_blocks, page_block_size, nheads_k, headdim), sequence b's keys (cu_seqlens_k[b + 1] -
    cu_seqlens_k[b] of them) in pages block_table[b, 0], block_table[b, 1], ..., which are gathered
    into packed keys before the call (a copy of the keys each call; gradients reach the pool)."""
    fn = "flash_attn_varlen_func"
    if block_table is not None:
        _check_dims(fn, (("q", q),), 3, {"q": "(total_q, nheads, headdim)"})
        k, v = _gather_pages(fn, q, k, v, block_table, cu_seqlens_k, max_seqlen_k)
    _check_dims(fn, (("q", q), ("k", k), ("v", v)), 3, {"q": "(total_q, nheads, headdim)",
                                                          "k": "(total_k, nheads_k, headdim)",
                                                          "v": "(total_k, nheads_k, headdim)"})
    return _varlen(fn, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                   causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def _gather_pages(fn, q, k, v, block_table, cu_seqlens_k, max_seqlen_k):
    """flash_attn_varlen_func's paged keys as packed ones: row n of sequence b, n < its length
    cu_seqlens_k[b + 1] - cu_seqlens_k[b], is row n % page_block_size of page
    block_table[b, n // page_block_size]; it goes to packed row cu_seqlens_k[b] + n of
    (batch * max_seqlen_k, nheads_k, headdim) tensors (at least every sequence's keys; rows past
    cu_seqlens_k's end belong to no sequence, read as page 0's first row), so the host never reads
    the lengths on a GPU; on the CPU, cu_seqlens_k[-1] rows. CPU values are checked (not while
    compiling, where they are data); CUDA ones are clamped to the table and the pool."""
    if not isinstance(block_table, torch.Tensor):
        raise TypeError(f"{fn}: block_table must be an int32 tensor (batch, max_num_blocks) or None, got "
                        f"{_type_name(block_table)}")
    if block_table.layout != torch.strided or block_table.dtype != torch.int32 or block_table.dim() != 2:
        raise TypeError(f"{fn}: block_table must be a dense int32 tensor (batch, max_num_blocks), got "
                        f"{block_table.dtype} of shape {_shape(block_table)}")
    if block_table.device != q.device:
        raise RuntimeError(f"{fn}: block_table must be on the device of q ({q.device}), got {block_table.device}")
    pool = "(num_blocks, page_block_size, nheads_k, headdim)"
    _check_dims(fn, (("k", k), ("v", v)), 4, {"k": pool, "v": pool})
    if v.shape != k.shape:
        raise ValueError(f"{fn}: v must have the shape of k {_shape(k)} (a paged pool {pool}), got {_shape(v)}")
    if k.shape[0] < 1 or k.shape[1] < 1:
        raise ValueError(f"{fn}: a paged k {pool} needs at least one block of at least one row, got {_shape(k)}")
    B, blocks = block_table.shape
    if not isinstance(cu_seqlens_k, torch.Tensor) or cu_seqlens_k.layout != torch.strided:
        raise TypeError(f"{fn}: cu_seqlens_k must be an int32 tensor (batch + 1,), got {_type_name(cu_seqlens_k)}")
    if cu_seqlens_k.dtype != torch.int32:
        raise TypeError(f"{fn}: cu_seqlens_k must be int32, got {cu_seqlens_k.dtype}")
    if _shape(cu_seqlens_k) != (B + 1,):
        raise ValueError(f"{fn}: cu_seqlens_k must be (batch + 1,) = ({B + 1},) for the {B} rows of block_table, got "
                         f"{_shape(cu_seqlens_k)}")
    if cu_seqlens_k.device != q.device:
        raise RuntimeError(f"{fn}: cu_seqlens_k must be on the device of q ({q.device}), got {cu_seqlens_k.device}")
    max_k = _index(max_seqlen_k)
    if not _is_int(max_k) or max_k < 0:
        raise TypeError(f"{fn}: max_seqlen_k must be a non-negative int (or a 0-d integer tensor), got {max_k!r}")
    if max_k > _INT32_MAX:
        raise ValueError(f"{fn}: max_seqlen_k must be at most 2**31 - 1 (lengths are int32, as cu_seqlens), got {max_k}")
    if k.shape[3] != q.shape[2] or k.shape[2] == 0 or q.shape[1] % k.shape[2]:
        raise ValueError(f"{fn}: k must be a paged pool {pool} with the headdim of q ({q.shape[2]}) and nheads_k "
                         f"dividing its nheads ({q.shape[1]}), got {_shape(k)}")
    page_size, capacity = k.shape[1], blocks * k.shape[1]
    cu = cu_seqlens_k.long()
    lengths = cu[1:] - cu[:-1]
    total = B * max_k  # packed rows: every sequence's keys, whatever the lengths (not read on a GPU)
    def outside():  # the table entries outside the pool in blocks their sequences use, (B, blocks) bool
        used = torch.arange(blocks, device=cu.device) * page_size < lengths.clamp(min=0)[:, None]
        return used & ((block_table < 0) | (block_table >= k.shape[0]))

    if _readable(cu_seqlens_k) and _readable(block_table) and B:
        b = int(lengths.argmax())
        if lengths[b] > max_k:
            raise ValueError(f"{fn}: max_seqlen_k {max_k} is smaller than the longest sequence ({int(lengths[b])}) "
                             "of cu_seqlens_k")
        if lengths[b] > capacity:
            raise ValueError(f"{fn}: sequence {b} has {int(lengths[b])} keys (cu_seqlens_k), more than the "
                             f"{capacity} rows of its {blocks} blocks (block_table's columns x page_block_size)")
        bad = outside()
        if bad.any():
            b, i = bad.nonzero()[0].tolist()
            raise ValueError(f"{fn}: block_table[{b}, {i}] = {int(block_table[b, i])} points outside the pool of "
                             f"{k.shape[0]} blocks (k.shape[0]) but sequence {b} uses that block")
        total = max(int(cu[-1]), 0)  # (CPU: the keys there are, not a row more)
    elif torch.compiler.is_compiling() and cu_seqlens_k.device.type == "cpu" and B:
        # the same checks as the graph runs (a host read would break it; the gather below clamps,
        # so a table past the pool gave a silently wrong result); not on a GPU, where Inductor's
        # device assert is off outside debug builds
        # (no sizes in the messages: dynamo shows a symbolic size as an int, and formatting it
        # specialises it to the value it was traced at)
        torch._assert_async((lengths <= max_k).all(),
                            f"{fn}: max_seqlen_k is smaller than the longest sequence of cu_seqlens_k")
        torch._assert_async((lengths <= capacity).all(),
                            f"{fn}: a sequence has more keys (cu_seqlens_k) than the rows of its blocks (block_table's "
                            "columns x page_block_size)")
        torch._assert_async(~outside().any(), f"{fn}: block_table points outside the pool of blocks (k.shape[0]) in "
                            "a block that its sequence uses")
    rows = torch.arange(total, device=q.device)
    seq = torch.searchsorted(cu, rows, right=True) - 1  # each packed row's sequence (B past cu_seqlens_k's end)
    at = seq.clamp(0, max(B - 1, 0))
    n = rows - cu[at]  # its position in the sequence (below its length, by the search)
    valid = (seq >= 0) & (seq < B)  # (wrong CUDA cu_seqlens_k: any rows, clamped to the table and the pool)
    n = torch.where(valid, n, 0).clamp(0, max(capacity - 1, 0))
    page = block_table.long()[at, n // page_size].clamp(0, k.shape[0] - 1) if blocks else torch.zeros_like(n)
    page = torch.where(valid, page, 0)
    return k[page, n % page_size], v[page, n % page_size]


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """qkv: (total, 3, nheads, headdim)."""
    fn = "flash_attn_varlen_qkvpacked_func"
    _check_dims(fn, (("qkv", qkv),), 4, {"qkv": "(total, 3, nheads, headdim)"})
    if qkv.shape[1] != 3:
        raise ValueError(f"{fn}: qkv must be (total, 3, nheads, headdim), got {_shape(qkv)}")
    return _varlen(fn, qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p,
                   softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs,
                   dict(_SCALE, q="qkv", k="qkv", v="qkv", cu_seqlens_q="cu_seqlens", cu_seqlens_k="cu_seqlens",
                        max_seqlen_q="max_seqlen", max_seqlen_k="max_seqlen"))


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q: (total_q, nheads, headdim); kv: (total_k, 2, nheads_k, headdim)."""
    fn = "flash_attn_varlen_kvpacked_func"
    _check_dims(fn, (("q", q),), 3, {"q": "(total_q, nheads, headdim)"})
    _check_dims(fn, (("kv", kv),), 4, {"kv": "(total_k, 2, nheads_k, headdim)"})
    if kv.shape[1] != 2:
        raise ValueError(f"{fn}: kv must be (total_k, 2, nheads_k, headdim), got {_shape(kv)}")
    return _varlen(fn, q, kv[:, 0], kv[:, 1], cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                   softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs,
                   dict(_SCALE, k="kv", v="kv"))


def _check_kvcache_shapes(fn, q, k_cache, v_cache, k, v, indexed):
    """The shapes of flash_attn_with_kvcache's 4-D tensors against each other, in the caller's
    (batch, seqlen, nheads, headdim) terms (flash_cuda's checks see the transposed views).
    indexed: the cache's first dim is not q's batch (a paged pool, or cache_batch_idx)."""
    B, _, H, D = q.shape
    if not indexed and k_cache.shape[0] != B:
        raise ValueError(f"{fn}: k_cache must be (batch, seqlen_cache, nheads_k, headdim) with the batch of q ({B}), "
                         f"got {_shape(k_cache)} (a paged pool (num_blocks, page_block_size, nheads_k, headdim) "
                         "needs block_table; a cache of other sequences, cache_batch_idx)")
    if k_cache.shape[3] != D:
        raise ValueError(f"{fn}: k_cache must have the headdim of q ({D}), got {_shape(k_cache)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"{fn}: v_cache must have the shape of k_cache {_shape(k_cache)}, got {_shape(v_cache)}")
    hkv = k_cache.shape[2]
    if hkv == 0 or H % hkv:
        raise ValueError(f"{fn}: nheads of q ({H}, q is (batch, seqlen_q, nheads, headdim)) must be a positive "
                         f"multiple of nheads_k of k_cache ({hkv}, k_cache is (..., nheads_k, headdim))")
    for name, x in (("k", k), ("v", v)):
        if x is not None and (x.shape[0] != B or x.shape[2:] != (hkv, D) or (name == "v" and k is not None
                                                                            and x.shape != k.shape)):
            raise ValueError(f"{fn}: {name} must be (batch, seqlen_new, nheads_k, headdim) = ({B}, seqlen_new, {hkv}, "
                             f"{D}){', the shape of k' if name == 'v' else ''}, got {_shape(x)}")


def _rotary(x, cos, sin, positions, interleaved):
    """x (batch, seqlen, nheads, headdim) with its first rotary_dim = 2 cos.shape[1] features turned
    by the angles of rows `positions` (batch, seqlen) of cos and sin, as FlashAttention-2's kvcache
    kernels do: in fp32 (fp64 for fp64 x), rounded once to x's dtype; pairs (2i, 2i + 1) when
    interleaved (GPT-J), else (i, i + rotary_dim / 2) (GPT-NeoX). The rest of x is unchanged."""
    half = cos.shape[1]
    wide = torch.promote_types(x.dtype, torch.float32)
    c, s = (t[positions].to(wide)[:, :, None] for t in (cos, sin))  # (batch, seqlen, 1, half)
    rot = x[..., :2 * half].to(wide)
    x1, x2 = (rot[..., 0::2], rot[..., 1::2]) if interleaved else (rot[..., :half], rot[..., half:])
    y1, y2 = x1 * c - x2 * s, x1 * s + x2 * c
    rot = torch.stack((y1, y2), -1).flatten(-2) if interleaved else torch.cat((y1, y2), -1)
    return torch.cat((rot.to(x.dtype), x[..., 2 * half:]), -1)


def _check_rotary(fn, q, k, rotary_cos, rotary_sin, seqlen_k):
    """FlashAttention-2's rotary arguments: cos and sin (seqlen_ro, rotary_dim / 2) in q's dtype and
    on its device, rotary_dim <= headdim, rows for every cache position (seqlen_ro >= seqlen_k,
    the cache's capacity), and new keys to rotate."""
    for name, x in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
        if x is None:
            other = "rotary_sin" if name == "rotary_cos" else "rotary_cos"
            raise ValueError(f"{fn}: {name} must be given with {other} (seqlen_ro, rotary_dim / 2)")
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor or None, got {_type_name(x)}")
    if k is None:
        raise ValueError(f"{fn}: rotary_cos and rotary_sin need k and v (new keys and values to rotate and "
                         "append), as in FlashAttention-2")
    D = q.shape[3]
    for name, x in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
        if x.layout != torch.strided or x.is_nested:
            raise TypeError(f"{fn}: {name} must be a strided (dense) tensor, got layout {x.layout}")
        if x.dtype != q.dtype:
            raise TypeError(f"{fn}: {name} must have the dtype of q ({q.dtype}), got {x.dtype}")
        if x.device != q.device:
            raise RuntimeError(f"{fn}: {name} must be on the device of q ({q.device}), got {x.device}")
        if x.dim() != 2 or 2 * x.shape[1] > D or x.shape[0] < seqlen_k:
            raise ValueError(f"{fn}: {name} must be (seqlen_ro, rotary_dim / 2) with seqlen_ro at least the cache's "
                             f"{seqlen_k} positions and rotary_dim at most headdim ({D}), got {_shape(x)}")
    if rotary_sin.shape != rotary_cos.shape:
        raise ValueError(f"{fn}: rotary_sin must have the shape of rotary_cos {_shape(rotary_cos)}, got "
                         f"{_shape(rotary_sin)}")


def _check_cache_batch_idx_values(fn, k_cache, n_new, cache_batch_idx):
    """CPU values of cache_batch_idx: each a batch of the cache, no two sequences that append
    sharing one. Compiled on the CPU, checked as the graph runs (the op would name the block table
    built from it); no values or sizes in the messages there (a host read breaks the graph, and
    formatting a symbolic size specialises it)."""
    if not _readable(cache_batch_idx):
        if torch.compiler.is_compiling() and cache_batch_idx.device.type == "cpu":
            torch._assert_async(((cache_batch_idx >= 0) & (cache_batch_idx < k_cache.shape[0])).all(),
                                f"{fn}: cache_batch_idx is out of range: it must index the sequences of k_cache "
                                "(dim 0)")
            if n_new and cache_batch_idx.numel() > 1:
                ordered = cache_batch_idx.sort().values
                torch._assert_async((ordered[1:] != ordered[:-1]).all(),
                                    f"{fn}: two sequences with the same cache_batch_idx would append their new keys "
                                    "to one cache; give each sequence that appends a cache of its own")
        return
    seen = {}
    for b, i in enumerate(cache_batch_idx.tolist()):
        if not 0 <= i < k_cache.shape[0]:
            raise ValueError(f"{fn}: cache_batch_idx[{b}] = {i} is out of range: it must index the "
                             f"{k_cache.shape[0]} sequences of k_cache (dim 0)")
        if n_new and i in seen:
            raise ValueError(f"{fn}: cache_batch_idx[{seen[i]}] = cache_batch_idx[{b}] = {i}: both sequences "
                             "would append their new keys to one cache; give each sequence that appends a "
                             "cache of its own")
        seen[i] = b


def _check_rotary_positions(fn, q, cache_seqlens, rows, local):
    """The rotary tables' rows reach q's last position: cache_seqlens[b] + seqlen_q - 1 when causal
    or local, else cache_seqlens[b] (the new keys' positions lie inside the cache, which the
    tables cover). CPU lengths only; without rows, any query is past them."""
    if not q.shape[1] or not cache_seqlens.numel():
        return
    if rows == 0:
        raise ValueError(f"{fn}: rotary_cos and rotary_sin have no positions (seqlen_ro = 0) for the queries")
    if _readable(cache_seqlens):
        b = int(cache_seqlens.argmax())
        last = int(cache_seqlens[b]) + (q.shape[1] - 1 if local else 0)
        if last >= rows:
            at = f"cache_seqlens[{b}]{' + seqlen_q - 1' if local else ''}"
            raise ValueError(f"{fn}: rotary_cos and rotary_sin have {rows} positions, but the last query of "
                             f"sequence {b} is at position {at} = {last}")
    elif torch.compiler.is_compiling() and cache_seqlens.device.type == "cpu":
        # the same check as the graph runs (a host read would break it; the positions are clamped to
        # the tables' last row, which gave a silently wrong result); no sizes in the message (dynamo
        # shows a symbolic size as an int, and formatting it specialises it)
        torch._assert_async((cache_seqlens + (q.shape[1] - 1 if local else 0) < rows).all(),
                            f"{fn}: rotary_cos and rotary_sin have fewer positions than the last query of a sequence "
                            f"(cache_seqlens{' + seqlen_q - 1' if local else ''}) needs")


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """q: (batch, seqlen_q, nheads, headdim); k_cache, v_cache: (batch_c, seqlen_cache, nheads_k, headdim),
    or with block_table (batch, max_blocks) int32 a pool (num_blocks, page_block_size, nheads_k,
    headdim); k, v: (batch, seqlen_new, nheads_k, headdim), written into the cache in place at
    cache_seqlens (flash_cuda.attention_with_kvcache on (B, H, N, D) views of the same memory).
    Returns out (batch, seqlen_q, nheads, headdim) and, with return_softmax_lse, lse (batch, nheads,
    seqlen_q). softmax_scale (default 1/sqrt(headdim)), causal, window_size, softcap and
    alibi_slopes ((nheads,) or (batch, nheads) float32) as in flash_attn_func, the mask's diagonal
    bottom-right aligned against each sequence's cache length after the append; num_splits: the
    key splits (0: chosen from the shape, else 1 to 128).

    As FlashAttention-2's (with a contiguous cache only, not with block_table):
    - cache_batch_idx int32 (batch,): sequence b uses batch cache_batch_idx[b] of the cache (batch_c
      may differ from batch); sequences that append need distinct ones.
    - cache_leftpad int32 (batch,): sequence b's keys start at row cache_leftpad[b] of its cache
      (the rows before are padding); cache_seqlens[b] still counts from row 0, the new keys go to
      row cache_seqlens[b], and masks and ALiBi count positions from the left pad (the kernels'
      own argument, flash_cuda.attention_with_kvcache's cache_leftpad).
    - rotary_cos, rotary_sin (seqlen_ro >= the cache's seqlen, rotary_dim / 2) in q's dtype, with k
      and v: the rotary embedding of the first rotary_dim features of k (positions cache_seqlens[b]
      + i) before the append, and of q (the same positions when causal or local, else all at
      cache_seqlens[b]); rotary_interleaved: pairs (2i, 2i + 1) (GPT-J) rather than (i, i +
      rotary_dim / 2) (GPT-NeoX). Computed before the call, in fp32, rounded once to q's dtype.
    """
    fn = "flash_attn_with_kvcache"
    layout = {"q": "(batch, seqlen_q, nheads, headdim)", "k_cache": "(batch or num_blocks, seqlen, nheads_k, headdim)",
              "v_cache": "(batch or num_blocks, seqlen, nheads_k, headdim)", "k": "(batch, seqlen_new, nheads_k, headdim)",
              "v": "(batch, seqlen_new, nheads_k, headdim)"}
    _check_dims(fn, [(n, x) for n, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("k", k), ("v", v))
                     if x is not None or n in ("q", "k_cache", "v_cache")], 4, layout)
    return_softmax_lse = bool(return_softmax_lse)
    rotary_interleaved = _flag(fn, "rotary_interleaved", rotary_interleaved)
    paged = block_table is not None
    for name, x in (("cache_batch_idx", cache_batch_idx), ("cache_leftpad", cache_leftpad)):
        if x is not None and paged:
            raise ValueError(f"{fn}: {name} indexes a contiguous cache; a paged one (block_table) takes none, as in "
                             "FlashAttention-2")
    _check_kvcache_shapes(fn, q, k_cache, v_cache, k, v, paged or cache_batch_idx is not None)
    B = q.shape[0]
    if cache_batch_idx is not None:
        _check_int32_rows(fn, "cache_batch_idx", cache_batch_idx, B, q.device, "an int32 tensor (batch,) or None",
                          "batch")
    if cache_leftpad is not None:
        _check_int32_rows(fn, "cache_leftpad", cache_leftpad, B, q.device, "an int32 tensor (batch,) or None",
                          "batch")
    # FlashAttention's kvcache call has no autograd: it reads tensors that require grad (q from a
    # trainable projection in a decode loop outside no_grad) as constants, and so does this one
    q, k_cache, v_cache, k, v, rotary_cos, rotary_sin = (
        x.detach() if isinstance(x, torch.Tensor) else x for x in (q, k_cache, v_cache, k, v, rotary_cos, rotary_sin))
    # (a malformed block_table goes to flash_cuda's checks, which name it)
    table_ok = not paged or (isinstance(block_table, torch.Tensor) and block_table.dim() == 2)
    seqlen_k = (block_table.shape[1] if paged else 1) * k_cache.shape[1] if table_ok else None
    window = _window(fn, window_size, seqlen_k)
    softmax_scale, causal, _, alibi_slopes = _options(fn, softmax_scale, causal, False, alibi_slopes)
    rotary = rotary_cos is not None or rotary_sin is not None
    indexed = cache_batch_idx is not None
    if (rotary or indexed) and table_ok:
        n_new = 0 if k is None else k.shape[1]
        cache_seqlens = _cache_seqlens(fn, cache_seqlens, B, seqlen_k, n_new, q.device)
        if _readable(cache_seqlens):
            _check_cache_seqlens(fn, cache_seqlens, seqlen_k, n_new)
        elif torch.compiler.is_compiling() and cache_seqlens.device.type == "cpu":
            # as the graph runs, before the rotary and cache_batch_idx checks below (the op checks
            # it too, but after them: a rotary message blamed the tables for a length out of range);
            # no sizes in the message (formatting a symbolic one specialises it)
            torch._assert_async(((cache_seqlens >= 0) & (cache_seqlens <= seqlen_k - n_new)).all(),
                                f"{fn}: cache_seqlens is out of range: it must be in [0, seqlen_cache - seqlen_new] "
                                "(each sequence's keys and its new ones fit the cache)")
        if rotary:
            _check_rotary(fn, q, k, rotary_cos, rotary_sin, seqlen_k)
            # FlashAttention-2 turns each query at its own position when causal or local (a window
            # bound, after the cut at seqlen_k above), else all of a sequence's at cache_seqlens[b]
            local = causal or window is not None
            rows = rotary_cos.shape[0]
            _check_rotary_positions(fn, q, cache_seqlens, rows, local)
            # (CUDA lengths are not read: positions clamped, as the kernels clamp what they index)
            last = max(rows - 1, 0)
            at = lambda n: (cache_seqlens.long()[:, None] + torch.arange(n, device=q.device)).clamp(0, last)  # noqa: E731
            q = _rotary(q, rotary_cos, rotary_sin, at(q.shape[1]) if local else at(1).expand(B, q.shape[1]),
                        rotary_interleaved)
            k = _rotary(k, rotary_cos, rotary_sin, at(n_new), rotary_interleaved)
        if indexed:  # a paged call whose pages are the cache's batches: the same memory, the append in place
            _check_cache_batch_idx_values(fn, k_cache, n_new, cache_batch_idx)
            if B == 0 or k_cache.shape[1] == 0:  # no key to read nor room to append: no pages needed
                k_cache, v_cache = (x.new_empty((B,) + x.shape[1:]) for x in (k_cache, v_cache))
                indexed = False
            else:
                block_table = cache_batch_idx[:, None]
    t = lambda x: None if x is None else x.transpose(1, 2)  # noqa: E731
    try:
        out, lse = attention_with_kvcache(t(q), t(k_cache), t(v_cache), t(k), t(v), cache_seqlens=cache_seqlens,
                                          block_table=block_table, causal=causal, scale=softmax_scale, window=window,
                                          softcap=_softcap(softcap), alibi_slopes=alibi_slopes, num_splits=num_splits,
                                          return_lse=True, cache_leftpad=cache_leftpad)
    except _CHECKED as err:
        # (with cache_batch_idx the table is a view of it: "block_table shares memory with k_cache"
        # named an argument the caller never passed, a review)
        err = _in_callers_terms(fn, err, dict(_SCALE, Nnew="seqlen_new", **({"block_table": "cache_batch_idx"}
                                                                            if indexed else {})))
        if indexed and type(err) in _CHECKED and "cache_leftpad" not in str(err):  # (shapes and strides of the pages)
            err = type(err)(f"{err} (with cache_batch_idx, k_cache and v_cache are read as a paged pool of the "
                            "cache's batches)")
        raise err from None
    # (batch, seqlen_q, nheads, headdim) contiguous, as FlashAttention returns it (callers view it as
    # (batch, seqlen_q, nheads * headdim)); a copy only where seqlen_q > 1
    out = out.transpose(1, 2).contiguous()
    return (out, lse) if return_softmax_lse else out


__all__ = ["flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func", "flash_attn_varlen_func",
           "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func", "flash_attn_with_kvcache"]
