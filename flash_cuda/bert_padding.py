"""FlashAttention-2's padding helpers (`flash_attn.bert_padding`, v2.6+) on flash_cuda, for code that
imports them beside the functions of flash_cuda.flash_attn_interface:

    # from flash_attn.bert_padding import index_first_axis, pad_input, unpad_input
    from flash_cuda.bert_padding import index_first_axis, pad_input, unpad_input

Same names (index_first_axis_residual and the classes IndexFirstAxis, IndexPutFirstAxis and
IndexFirstAxisResidual with their apply() too), signatures and results: unpad_input returns five
values (the fifth: the lengths of attention_mask alone, where unused_mask marks tokens that are
allocated but not attended to), unpad_input_for_concatenated_sequences reads a mask that lists the
lengths of the sequences packed into each row. Everything is differentiable in the hidden states;
bad input raises an exception naming the argument, as flash_cuda's own unpad_input and pad_input.
"""
import torch

from .api import _check_index_range, _index, _is_int, _pad, _shape, _type_name, _unpad


def _check_indices(fn, indices, n, x, what, distinct=False):
    """indices: 1-D int64 on x's device, each in [0, n) (what: n's name), with `distinct` none
    twice (api._check_index_range)."""
    if not isinstance(indices, torch.Tensor) or indices.dtype != torch.int64 or indices.dim() != 1:
        raise TypeError(f"{fn}: indices must be a 1-D int64 tensor, got "
                        f"{indices.dtype if isinstance(indices, torch.Tensor) else _type_name(indices)}")
    if indices.device != x.device:
        raise RuntimeError(f"{fn}: indices must be on the device of the values ({x.device}), got {indices.device}")
    _check_index_range(fn, indices, n, what, distinct)


def index_first_axis(input, indices):
    """input (N, ...) -> input[indices] (len(indices), ...); differentiable in input."""
    fn = "flash_cuda.bert_padding.index_first_axis"
    if not isinstance(input, torch.Tensor) or input.dim() < 2:
        raise ValueError(f"{fn}: input must be a tensor of at least 2 dims (N, ...), got "
                         f"{_shape(input) if isinstance(input, torch.Tensor) else _type_name(input)}")
    _check_indices(fn, indices, input.shape[0], input, "input.shape[0]")
    return input[indices]


class IndexFirstAxisResidual(torch.autograd.Function):
    """index_first_axis_residual's gradient: the residual's and the rows' scattered back."""

    @staticmethod
    def forward(ctx, input, indices):
        ctx.save_for_backward(indices)
        # (the residual is input itself, detached: the Function returns its gradient below)
        return input[indices], input.detach()

    @staticmethod
    def backward(ctx, grad_rows, grad_residual):
        (indices,) = ctx.saved_tensors
        grad = grad_residual.clone()
        grad.index_add_(0, indices, grad_rows)  # (a row taken twice gets both gradients)
        return grad, None


def index_first_axis_residual(input, indices):
    """input (N, ...) -> (input[indices], input): the rows and the whole tensor, both differentiable
    in input (the residual of a layer applied to the rows alone, as FlashAttention's BERT uses it)."""
    fn = "flash_cuda.bert_padding.index_first_axis_residual"
    if not isinstance(input, torch.Tensor) or input.dim() < 2:
        raise ValueError(f"{fn}: input must be a tensor of at least 2 dims (N, ...), got "
                         f"{_shape(input) if isinstance(input, torch.Tensor) else _type_name(input)}")
    _check_indices(fn, indices, input.shape[0], input, "input.shape[0]")
    return IndexFirstAxisResidual.apply(input, indices)


def index_put_first_axis(values, indices, first_axis_dim):
    """values (len(indices), ...) -> a zero tensor (first_axis_dim, ...) with values at indices."""
    fn = "flash_cuda.bert_padding.index_put_first_axis"
    if not isinstance(values, torch.Tensor) or values.dim() < 2:
        raise ValueError(f"{fn}: values must be a tensor of at least 2 dims (len(indices), ...), got "
                         f"{_shape(values) if isinstance(values, torch.Tensor) else _type_name(values)}")
    n = _index(first_axis_dim)
    if not _is_int(n) or n < 0:
        raise ValueError(f"{fn}: first_axis_dim must be a non-negative int, got {first_axis_dim!r}")
    _check_indices(fn, indices, n, values, "first_axis_dim", distinct=True)
    if indices.shape[0] != values.shape[0]:
        raise ValueError(f"{fn}: indices must have one entry per row of values ({values.shape[0]}), got "
                         f"{indices.shape[0]}")
    return values.new_zeros((n, *values.shape[1:])).index_put((indices,), values)


def unpad_input(hidden_states, attention_mask, unused_mask=None):
    """hidden_states (B, S, ...), attention_mask (B, S) (nonzero = a real token), unused_mask
    (B, S) or None (nonzero = a token kept in the packed output but not counted as used) ->
    (hidden_states (total, ...), indices (total,) int64, cu_seqlens (B + 1,) int32, max_seqlen_in_batch
    int, used_seqlens_in_batch (B,) int32)."""
    return _unpad("flash_cuda.bert_padding.unpad_input", hidden_states, attention_mask, unused_mask,
                  ("hidden_states", "attention_mask"))


def unpad_input_for_concatenated_sequences(hidden_states, attention_mask_in_length):
    """Rows that each hold several sequences back to back: attention_mask_in_length (B, S) lists the
    lengths of row b's sequences, then zeros (e.g. [[2, 3, 0, 0, 0], ...] for a row of a 2- and a
    3-token sequence followed by padding) -> (hidden_states (total, ...), indices, cu_seqlens (one
    entry per sequence + 1) int32, max_seqlen_in_batch int), each sequence its own in varlen
    attention."""
    fn = "flash_cuda.bert_padding.unpad_input_for_concatenated_sequences"
    lengths = attention_mask_in_length
    if not isinstance(lengths, torch.Tensor) or lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
        raise TypeError(f"{fn}: attention_mask_in_length must be an integer tensor (B, S) of sequence lengths, got "
                        f"{lengths.dtype if isinstance(lengths, torch.Tensor) else _type_name(lengths)}")
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() < 2 or lengths.shape != hidden_states.shape[:2]:
        raise ValueError(f"{fn}: attention_mask_in_length must be (B, S) matching hidden_states' first two dims, "
                         f"got {_shape(lengths)} for hidden_states of shape "
                         f"{_shape(hidden_states) if isinstance(hidden_states, torch.Tensor) else _type_name(hidden_states)}")
    if lengths.device != hidden_states.device:
        raise RuntimeError(f"{fn}: attention_mask_in_length must be on hidden_states' device "
                           f"({hidden_states.device}), got {lengths.device}")
    # (one read of the values: on a GPU the function synchronises anyway, for max_seqlen and the
    # sizes of the indices)
    if lengths.numel() and not torch.compiler.is_compiling():
        per_row = lengths.sum(1)
        if bool((lengths < 0).any() | (per_row > lengths.shape[1]).any()):
            raise ValueError(f"{fn}: attention_mask_in_length must hold non-negative lengths whose sum per row is at "
                             f"most S = {lengths.shape[1]}, got row sums {per_row.tolist()}")
    elif lengths.numel() and lengths.device.type == "cpu":
        # compiled: checked as the graph runs (the lengths made decreasing cu_seqlens or ones past the
        # rows, silently); no sizes in the message (formatting a symbolic one specialises it). Not
        # on a GPU, where Inductor's device assert is off outside debug builds.
        torch._assert_async(((lengths >= 0).all() & (lengths.sum(1) <= lengths.shape[1]).all()),
                            f"{fn}: attention_mask_in_length must hold non-negative lengths whose sum per row is at "
                            "most S")
    positions = torch.arange(lengths.shape[1], device=lengths.device)
    real = positions < lengths.sum(1, keepdim=True)  # (B, S): the first sum(lengths[b]) tokens of row b
    seqlens = lengths.reshape(-1)[lengths.reshape(-1) != 0].to(torch.int32)  # row by row, in order
    indices = torch.nonzero(real.reshape(-1)).flatten()
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(seqlens, 0, dtype=torch.int32), (1, 0))
    # (the largest entry of the lengths themselves, non-negative: no branch on how many sequences
    # there are, which a compiled graph could not take)
    max_seqlen = int(lengths.max().clamp(min=0)) if lengths.numel() else 0
    return hidden_states.reshape(-1, *hidden_states.shape[2:])[indices], indices, cu_seqlens, max_seqlen


def pad_input(hidden_states, indices, batch, seqlen):
    """Inverse of unpad_input: (total, ...) -> (batch, seqlen, ...) with zeros at the padding."""
    return _pad("flash_cuda.bert_padding.pad_input", hidden_states, indices, batch, seqlen, "hidden_states")


class IndexFirstAxis:
    """FlashAttention's name for index_first_axis's Function: IndexFirstAxis.apply(input, indices)."""
    apply = staticmethod(index_first_axis)


class IndexPutFirstAxis:
    """FlashAttention's name for index_put_first_axis's Function: IndexPutFirstAxis.apply(values,
    indices, first_axis_dim)."""
    apply = staticmethod(index_put_first_axis)


__all__ = ["index_first_axis", "index_first_axis_residual", "index_put_first_axis", "unpad_input",
           "unpad_input_for_concatenated_sequences", "pad_input", "IndexFirstAxis", "IndexFirstAxisResidual",
           "IndexPutFirstAxis"]
