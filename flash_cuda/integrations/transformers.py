"""flash_cuda as a Hugging Face transformers attention implementation.

    import flash_cuda.integrations.transformers          # registers "flash_cuda" (idempotent)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="flash_cuda")
    model.set_attn_implementation("flash_cuda")
    SentenceTransformer(path, model_kwargs={"attn_implementation": "flash_cuda"})

transformers treats every implementation whose name contains "flash" as a FlashAttention
implementation (`is_flash_attention_requested` is a substring test): models then prepare
FlashAttention's masks (a 2-D padding mask, or none), pass packed sequences as `cu_seq_lens_*` or
position_ids, and at load time transformers imports the implementation's FlashAttention-2
functions. flash_cuda is one, so it takes that role whole:
- the attention function (`attention_forward`, registered with `AttentionInterface`) gets what a
  FlashAttention implementation gets and runs flash_cuda on it, without host reads of mask values
  (so `torch.compile(fullgraph=True)` traces it): a padding mask becomes a key-padding mask (no
  unpadding), a static cache's unused tail is sliced off by shape, `cu_seq_lens_*` and packed
  position_ids (split by the eager rule, in every row) go to `varlen_attention`; causal masks are
  bottom-right aligned (prefill, chunked prefill, decode), sliding windows are `(sliding_window - 1, 0)` (transformers' convention), GQA stays GQA, and T5's
  relative position bias (`position_bias`) becomes flash_cuda's float attention mask (with its
  gradient);
- the mask function (registered with `AttentionMaskInterface`) is transformers' FlashAttention
  mask without its host read (outside compilation an all-ones mask still becomes None, so unpadded
  batches run the dense kernels), packed rows' sequence starts where the model's layers do not
  see position_ids, and sdpa's 4-D mask for models whose masks go beyond causal, sliding and
  padding;
- transformers' loader of FlashAttention functions is taught the name "flash_cuda", answering
  with `flash_cuda.flash_attn_interface` (the one private hook: `_hook_flash_loader`, guarded by a
  test that fails when transformers changes it).

fp32 inputs on CUDA run in fp32 on the kernels' TF32 path (3xTF32 unless torch allows TF32), or in
the autocast dtype when autocast is on, the output cast back (transformers' FlashAttention wrapper
casts to the autocast dtype too); the CPU backend runs every dtype as it is. Unsupported features raise: attention
probabilities (`output_attentions`), attention sinks (`s_aux`, `sinks`), paged continuous batching.
"""
import functools
import os

import torch

from .. import api
from ..emulate import runs_cuda_kernels

NAME = "flash_cuda"


# mask_function's packed rows: (batch, n) int16, 1 where a sequence starts. A dtype no padding
# mask has (transformers' are bool, users' int64, int32, uint8 or float), so the meaning survives
# copies and device moves (an attribute on the tensor did not: a copy became an all-ones padding
# mask; audit)
_STARTS_DTYPE = torch.int16


def _collects_attentions():
    """Whether the running model collects attention probabilities (output_attentions, passed to the
    model or set in its config: transformers' output collector, which its layers' kwargs do not
    show). Not when compiling (the collector is then a global of transformers' own)."""
    if torch.compiler.is_compiling():
        return False
    try:
        from transformers.utils.output_capturing import _active_collector
        collected = _active_collector.get()
    except Exception:  # noqa: BLE001 (a transformers without it: kwargs tell)
        return False
    return isinstance(collected, dict) and any(k in collected for k in ("attentions", "cross_attentions"))


def _kernel_dtype(q):
    """The dtype the attention runs in: q's, or for fp32 on the CUDA kernels (a GPU, or the CPU inside
    flash_cuda.emulate()) under autocast to float16 / bfloat16, the autocast dtype."""
    dev = q.device.type
    if q.dtype != torch.float32 or not runs_cuda_kernels(q) or not torch.is_autocast_enabled(dev):
        return q.dtype
    dtype = torch.get_autocast_dtype(dev)
    return dtype if dtype in (torch.float16, torch.bfloat16) else q.dtype


def _sequence_starts(position_ids, batch, n):
    """(batch * n,) bool: where a sequence starts in the rows laid end to end. transformers' eager
    and sdpa rule (`masking_utils.find_packed_sequence_indices`): a row's first token, and every
    token whose position does not follow the one before it by 1 (a restart at 0, at 1, at
    RoBERTa's padding_idx + 1, or a jump)."""
    pos = position_ids.expand(batch, n)
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] - pos[:, :-1] != 1
    return starts.reshape(-1)


def _packed_from_starts(starts, batch, n):
    """cu_seqlens (int32) and max_seqlen of the sequences packed in `batch` rows of n tokens (rows
    laid end to end; starts: (batch * n,) bool), without a data-dependent shape when compiling:
    there every position is a potential start, the unused entries are empty sequences at the end,
    and max_seqlen is n."""
    total = batch * n
    idx = torch.arange(total, device=starts.device, dtype=torch.int32)
    end = torch.full((1,), total, dtype=torch.int32, device=starts.device)
    if torch.compiler.is_compiling():
        return torch.cat([torch.sort(torch.where(starts, idx, torch.full_like(idx, total))).values, end]), n
    cu = torch.cat([idx[starts], end])
    return cu, int((cu[1:] - cu[:-1]).max())


def _is_packed(position_ids, batch, nq, nk):
    """Packed sequences in the rows (no cache: nq == nk), by transformers' eager and sdpa rule: a
    position that does not follow the one before it by 1 (a host read, outside compilation only;
    compiled, position_ids are always taken as packing, which is exact for whole rows too)."""
    if position_ids is None or position_ids.dim() > 2 or nq != nk or nq == 1 or position_ids.shape[-1] != nq:
        return False  # (3-D: multimodal rotary positions, GLM-4.5V's, Ernie-4.5-VL's: eager splits none)
    if torch.compiler.is_compiling():
        return True
    return bool(_sequence_starts(position_ids, batch, nq).reshape(batch, nq)[:, 1:].any())


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                      softcap=None, is_causal=None, s_aux=None, **kwargs):
    """transformers' attention-function contract: query (B, Hq, Nq, D), key/value (B, Hkv, Nk, D), the
    mask from `mask_function` below (None, a 2-D padding mask (B, <= Nk) or a custom 4-D mask);
    returns (out (B, Nq, Hq, D), None)."""
    fn = "flash_cuda (transformers attention)"
    if kwargs.get("output_attentions", False) or _collects_attentions():
        raise ValueError(f"{fn}: output_attentions=True is not supported (flash_cuda never materialises the "
                         "attention probabilities); load the model with attn_implementation='eager' for them")
    if s_aux is not None or kwargs.get("sinks") is not None:
        raise NotImplementedError(f"{fn}: attention sinks ({'s_aux' if s_aux is not None else 'sinks'}) are not "
                                  "supported")
    if kwargs.get("block_table") is not None:
        raise NotImplementedError(f"{fn}: paged continuous batching (block_table) is not supported")
    for name in ("indices", "block_indices"):  # DeepSeek-V3.2's sparse attention: its top-k keys
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"{fn}: sparse attention over selected keys ({name}) is not supported; "
                                      "load the model with attn_implementation='sdpa'")
    # transformers' FlashAttention path: the model's `deterministic` (ModernBERT's
    # deterministic_flash_attn), else FLASH_ATTENTION_DETERMINISTIC=1 (Trainer's full_determinism);
    # torch.use_deterministic_algorithms(True) is read by flash_cuda itself
    deterministic = kwargs.get("deterministic")
    if deterministic is None:
        deterministic = os.environ.get("FLASH_ATTENTION_DETERMINISTIC", "0") == "1"
    out_dtype, dtype = query.dtype, _kernel_dtype(query)
    q, k, v = (x.to(dtype) for x in (query, key, value))
    if is_causal is None:
        is_causal = getattr(module, "is_causal", None)
    if is_causal is None:
        # a custom 4-D mask is applied as it is (causality in it); no mask or a padding one needs to
        # know. Modules without the attribute: Splinter's, ALIGN's and CLAP's text encoders (a
        # default of True made them causal), Mllama's cross-attention without its mask
        if attention_mask is None or attention_mask.dim() == 2:
            raise ValueError(f"{fn}: {type(module).__name__} has no is_causal attribute and the model passed no "
                             "is_causal, so whether its attention is causal is unknown; load the model with "
                             "attn_implementation='sdpa' or 'eager'")
        is_causal = False
    # Multi-head latent attention (DeepSeek-V2/V3, MiniCPM3: the value head dim differs from the
    # query's): flash_cuda takes one head dim, so the narrower side is padded with zeros (zeros in
    # q and k add nothing to the scores; zero value columns give zero output columns, cropped below),
    # as transformers' FlashAttention wrapper pads the value
    d_qk, d_v = q.shape[-1], v.shape[-1]
    if d_v != d_qk:
        scaling = scaling if scaling is not None else d_qk ** -0.5
        if d_v < d_qk:
            v = torch.nn.functional.pad(v, [0, d_qk - d_v])
        else:
            q, k = (torch.nn.functional.pad(x, [0, d_v - d_qk]) for x in (q, k))
    B, Nq = q.shape[0], q.shape[2]
    window = None
    if sliding_window is not None and sliding_window > 0:
        window = (sliding_window - 1, 0 if is_causal else sliding_window - 1)
    common = dict(causal=bool(is_causal), scale=scaling, window=window, softcap=softcap or 0.0,
                  dropout_p=float(dropout or 0.0), deterministic=bool(deterministic))
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    position_ids = kwargs.get("position_ids")
    # packed sequences found by mask_function (models that do not pass position_ids down)
    segments = None
    if attention_mask is not None and attention_mask.dtype == _STARTS_DTYPE and attention_mask.dim() == 2:
        segments, attention_mask = attention_mask, None
    # T5's relative position bias: an additive float bias (1 or B, H, Nq, Nk) that is a function of a
    # learned parameter; it goes in as flash_cuda's float attn_mask, which gets its gradient
    position_bias = kwargs.get("position_bias")
    packed = (cu_q is not None and cu_k is not None) or segments is not None or (
        attention_mask is None and _is_packed(position_ids, B, Nq, k.shape[2]))
    if position_bias is not None and packed:
        raise NotImplementedError(f"{fn}: a position bias (T5) with packed sequences is not supported")
    if cu_q is not None and cu_k is not None:  # packed sequences, lengths given (DataCollatorWithFlattening)
        message = (f"{fn}: a padding attention_mask together with packed sequences (cu_seq_lens_q/k) is not "
                   "supported; pack the real tokens only")
        # (outside compilation an all-ones mask became None; compiled, the mask function keeps a 2-D
        # one, no host read: it is checked as the graph runs instead, where a mask with padding had
        # been dropped and its padding attended, silently. Not on a GPU, where Inductor's device
        # assert is off outside debug builds. Any other mask is refused, compiled or not.)
        if attention_mask is not None and (not torch.compiler.is_compiling() or attention_mask.dim() != 2):
            raise NotImplementedError(message)
        if attention_mask is not None and attention_mask.device.type == "cpu":
            torch._assert_async((attention_mask != 0).all(), message)
        if B != 1:
            raise ValueError(f"{fn}: packed sequences (cu_seq_lens_q/k) need a batch of one row, got query of "
                             f"shape {tuple(q.shape)}")
        max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
        out = _varlen(q, k, v, cu_q.to(torch.int32), cu_k.to(torch.int32), max_q, max_k, common)
    elif packed:
        if segments is not None:
            starts = segments.reshape(-1) != 0
        else:
            starts = _sequence_starts(position_ids, B, Nq)
        cu, n = _packed_from_starts(starts, B, Nq)
        out = _varlen(q, k, v, cu, cu, n, n, common)
    else:
        mask = None
        if attention_mask is not None and attention_mask.dim() == 2:
            # A static cache holds more key slots than the mask covers: the mask's length is the keys
            # seen so far (transformers' FlashAttention path slices the same way)
            n_keys = attention_mask.shape[1]
            k, v = k[:, :, :n_keys], v[:, :, :n_keys]
            mask = attention_mask[:, None, None, :].to(torch.bool)
        elif attention_mask is not None:
            # a custom 4-D mask carries the causal structure and any window itself: sdpa and eager
            # apply it as it is (a window on top would hide keys the mask shows)
            if attention_mask.dim() != 4:
                raise ValueError(f"{fn}: attention_mask must be a 2-D padding mask (batch, keys) or a 4-D mask "
                                 f"(batch, 1 or heads, queries, keys), got shape {tuple(attention_mask.shape)}")
            if attention_mask.dtype != torch.bool and not attention_mask.is_floating_point():
                raise TypeError(f"{fn}: a 4-D attention_mask must be bool (True = attend) or floating (added to "
                                f"the scores), as for sdpa, got {attention_mask.dtype}")
            acc = torch.float64 if q.dtype == torch.float64 else torch.float32
            mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask.to(acc)
            common["causal"], common["window"] = False, None
        if position_bias is not None:
            bias = position_bias[..., :k.shape[2]].to(torch.float64 if q.dtype == torch.float64 else torch.float32)
            if mask is None:
                mask = bias
            elif mask.dtype == torch.bool:
                mask = bias.masked_fill(~mask, float("-inf"))
            else:
                mask = bias + mask
        out = api.attention(q, k, v, attn_mask=mask, **common)
        out = out.transpose(1, 2)
    return out[..., :d_v].to(out_dtype), None


def _varlen(q, k, v, cu_q, cu_k, max_q, max_k, common):
    """(B, H, N, D) -> varlen_attention on the rows laid end to end, (B N, H, D) (views for one
    row) -> (B, N, H, D)."""
    B, Nq, Nk = q.shape[0], q.shape[2], k.shape[2]
    max_q = api._index(max_q) if max_q is not None else Nq  # (a SymInt under torch.compile: not int())
    max_k = api._index(max_k) if max_k is not None else Nk
    rows = lambda x: x.transpose(1, 2).reshape(B * x.shape[2], x.shape[1], x.shape[3])
    out = api.varlen_attention(rows(q), rows(k), rows(v), cu_q, cu_k, max_q, max_k, **common)
    return out.reshape(B, Nq, *out.shape[1:])


def _sees_key_beside(mask_fn, batch_size, q_length, q_offset, step, device):
    """(batch, q_length - 1) bool: whether query q (the 1st to the (q_length-1)th from q_offset,
    the 2nd on with step -1) sees key q + step, asked of transformers' mask function itself over
    that diagonal with index tensors, as transformers' own non-vmap masks call it (O(B N)). None
    where it cannot answer."""
    try:
        b = torch.arange(batch_size, device=device)[:, None]
        q = torch.arange(q_length - 1, device=device)[None, :] + int(q_offset) + (1 if step < 0 else 0)
        seen = mask_fn(b, torch.zeros((), dtype=torch.long, device=device), q, q + step)
        return seen.expand(batch_size, q_length - 1)
    except Exception:  # noqa: BLE001 (any failure: no answer)
        return None


def _sees_the_next_key(mask_fn, batch_size, q_length, q_offset, device):
    """Whether some query of the q_length from q_offset sees the key right after it (a host read);
    None where the function cannot answer."""
    seen = _sees_key_beside(mask_fn, batch_size, q_length, q_offset, 1, device)
    return None if seen is None else bool(seen.any())


def _hides_future_keys(mask_fn, seen):
    """Whether the mask function hides key `seen` from query `seen - 1` (causal masks, sliding or
    chunked; None is the interface's default, causal). One it cannot answer counts as not hiding
    (all keys visible, transformers' own FlashAttention behaviour)."""
    return mask_fn is None or _sees_the_next_key(mask_fn, 1, 2, seen - 1, "cpu") is False


def _composes_an_or_mask(mask_fn, depth=0):
    """Whether transformers' mask function is, or is built from, an `or_masks` (its inner function
    `or_mask`; tests/test_transformers.py checks the name): a blockwise overlay where use_vmap is
    False. Read from the closures, which dynamo traces as constants (no host read of data)."""
    if not callable(mask_fn) or depth > 8:
        return False
    if getattr(mask_fn, "__name__", None) == "or_mask":
        return True
    for cell in getattr(mask_fn, "__closure__", None) or ():
        inner = cell.cell_contents
        for f in inner if isinstance(inner, (tuple, list)) else (inner,):
            if callable(f) and _composes_an_or_mask(f, depth + 1):
                return True
    return False


def _needs_sdpa_mask(batch_size, q_length, q_offset, mask_function, attention_mask, kwargs):
    """Whether the mask goes beyond causal, sliding and padding. masking_utils sets use_vmap exactly
    when it combined an or/and mask function; a blockwise overlay (PaliGemma's bidirectional
    prefix, `block_sequence_ids`) only clears a causal mask's allow_is_causal_skip, as packed
    sequences (attention_forward splits those itself) and compiled one-token decoding steps
    (q_length 1) do too: with a padding mask packing is off, without one the function is asked
    whether a query sees the key after it (an overlay's block does, packed sequences and sliding
    windows never); compiled, where it cannot be asked, by the function's composition (a
    prefix-LM's overlay was lost there, found by an audit); bidirectional masks (they pass
    allow_is_bidirectional_skip) always clear it."""
    if kwargs.get("use_vmap"):
        return True
    if kwargs.get("allow_is_causal_skip") is not False or q_length <= 1 or "allow_is_bidirectional_skip" in kwargs:
        return False
    if attention_mask is not None:
        return True
    if torch.compiler.is_compiling():
        # the function cannot be asked without a host read (and compiled, transformers clears
        # allow_is_causal_skip for every call with position_ids, its packing check being data):
        # an overlay is told by its composition instead, an or_masks (use_vmap False here)
        return _composes_an_or_mask(mask_function)
    return _sees_the_next_key(mask_function, batch_size, q_length, q_offset, kwargs.get("device", "cpu")) is True


def _packed_sequences(mask_fn, batch_size, q_length, kv_length, q_offset, kv_offset, kwargs):
    """(batch, n) _STARTS_DTYPE, 1 where a sequence starts, of packed rows, asked of the mask
    function where transformers cleared allow_is_causal_skip without a padding mask and the
    function hides no next key (_needs_sdpa_mask): a query that does not see the key just
    before it starts a sequence. attention_forward splits the rows there, also for models whose
    layers do not pass position_ids down (GPTBigCode, Persimmon). None where nothing is packed or
    the function cannot be asked (outside compilation only: a host read)."""
    if (kwargs.get("allow_is_causal_skip") is not False or q_length <= 1 or kv_length != q_length
            or int(q_offset) != 0 or int(kv_offset) != 0 or "allow_is_bidirectional_skip" in kwargs
            or mask_fn is None):
        return None
    sees_previous = _sees_key_beside(mask_fn, batch_size, q_length, 0, -1, kwargs.get("device", "cpu"))
    if sees_previous is None or bool(sees_previous.all()):
        return None
    starts = torch.ones(batch_size, q_length, dtype=_STARTS_DTYPE, device=sees_previous.device)
    starts[:, 1:] = ~sees_previous
    return starts


_FLASH_NATIVE = {}  # config class -> whether transformers runs its own FlashAttention on its models


def _flash_native(config):
    """Whether transformers supports its own FlashAttention on the model of this config (the base
    model class's _supports_flash_attn, through the auto mapping; False where unknown). Looked up
    outside compilation and kept; compiled, a config not seen before counts as unknown."""
    cls = type(config)
    if cls not in _FLASH_NATIVE and not torch.compiler.is_compiling():
        try:
            from transformers.models.auto.modeling_auto import MODEL_MAPPING
            model = MODEL_MAPPING[cls]
            _FLASH_NATIVE[cls] = bool(getattr(model, "_supports_flash_attn", False)
                                      or getattr(model, "_supports_flash_attn_2", False))
        except Exception:  # noqa: BLE001 (no such mapping: unknown)
            _FLASH_NATIVE[cls] = False
    return _FLASH_NATIVE.get(cls, False)


def _asked_to_materialise(q_length, mask_fn, attention_mask, kwargs):
    """Whether a model transformers runs no FlashAttention on asked for a materialised causal mask
    (allow_is_causal_skip=False) to build on: Doge adds its dynamic mask to it, and given None it
    attended to later tokens (audit). Outside compilation what is left after transformers' own
    reasons to clear the flag (overlays, packing: _needs_sdpa_mask and _packed_sequences took
    those); compiled, where they cannot be asked, every such call (packing then goes into the
    dense mask too). Models transformers' FlashAttention runs (Falcon, which asks for it for ALiBi)
    get what that path gets: None, the causal kernels."""
    if (kwargs.get("allow_is_causal_skip") is not False or kwargs.get("use_vmap") or q_length <= 1
            or attention_mask is not None or "allow_is_bidirectional_skip" in kwargs or mask_fn is None):
        return False
    config = kwargs.get("config")  # (None: not transformers' call, which passes it)
    return config is not None and not _flash_native(config)


def mask_function(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None,
                  **kwargs):
    """transformers' FlashAttention mask (`masking_utils.flash_attention_mask`) without host reads when
    compiling: the 2-D padding mask's last kv_length columns, or None when there is no mask (or,
    outside compilation, when it is all ones over exactly kv_length keys); without a mask, outside
    compilation, ones over the keys seen so far when a static cache holds more slots. A model that
    changes the mask beyond causal, sliding and padding (an `or_mask_function` or
    `and_mask_function`, or a blockwise overlay: a prefix-LM like PaliGemma, Gemma 3's
    bidirectional image tokens, per-layer windows) gets sdpa's 4-D boolean mask, which
    attention_forward applies as it is (transformers keeps its own FlashAttention off those models;
    their masks would be lost)."""
    if _needs_sdpa_mask(batch_size, q_length, q_offset, mask_function, attention_mask, kwargs):
        from transformers.masking_utils import sdpa_mask
        return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function=mask_function,
                         attention_mask=attention_mask, allow_is_causal_skip=False, use_vmap=True,
                         device=kwargs.get("device", "cpu"))
    if attention_mask is None and not torch.compiler.is_compiling():
        segments = _packed_sequences(mask_function, batch_size, q_length, kv_length, q_offset, kv_offset, kwargs)
        if segments is not None:
            return segments
    if _asked_to_materialise(q_length, mask_function, attention_mask, kwargs):
        from transformers.masking_utils import sdpa_mask
        return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function=mask_function,
                         allow_is_causal_skip=False, device=kwargs.get("device", "cpu"))
    if attention_mask is None:
        # No padding mask, but maybe a static cache: kv_length then counts all its slots, filled or
        # not, and the keys seen so far are q_offset + q_length. transformers' FlashAttention path
        # attends to every slot there (the empty ones as keys, the causal diagonal at the last
        # one); a mask of ones over the seen keys makes attention_forward take those alone. Only
        # for masks that hide future keys: cross-attention (a bidirectional mask over the encoder's
        # kv_length keys, q_length decoder queries) sees every key.
        if not torch.compiler.is_compiling() and int(kv_offset) == 0:
            seen = int(q_offset) + q_length
            if seen < kv_length and _hides_future_keys(mask_function, seen):
                return torch.ones(batch_size, seen, dtype=torch.bool, device=kwargs.get("device"))
        return None
    attention_mask = attention_mask[:, -kv_length:]
    if (attention_mask.shape[1] == kv_length and not torch.compiler.is_compiling()
            and bool(attention_mask.all())):
        return None
    return attention_mask


def _hook_flash_loader():
    """Teach transformers' loader of FlashAttention functions (`modeling_flash_attention_utils.
    _lazy_imports`, called for every implementation whose name contains "flash") the name
    "flash_cuda". The one private hook of this integration; tests/test_transformers.py checks that
    it is in place and fails when transformers changes the function."""
    from transformers import modeling_flash_attention_utils as fa_utils
    original = fa_utils._lazy_imports
    if getattr(original, "_flash_cuda_hook", False):
        return

    @functools.wraps(original)
    def _lazy_imports(implementation, *args, **kwargs):
        if implementation == NAME:
            from .. import flash_attn_interface as fa
            return (fa.flash_attn_func, fa.flash_attn_varlen_func, fa.flash_attn_with_kvcache, fa_utils._pad_input,
                    fa_utils._unpad_input)
        return original(implementation, *args, **kwargs)

    _lazy_imports._flash_cuda_hook = True
    fa_utils._lazy_imports = _lazy_imports


def register():
    """Register "flash_cuda" with transformers (attention function, mask function, FlashAttention
    loader). Idempotent; called when this module is imported."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, mask_function)
    _hook_flash_loader()


register()
