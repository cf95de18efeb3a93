"""Fake (shape) and autograd registrations of the flash_cuda ops (attention, varlen, dropout, KV cache).

The ops themselves are defined in C++ (csrc/ops.cpp, TORCH_LIBRARY); importing
flash_cuda._C registers them with the dispatcher.
"""
import torch
import torch.autograd.forward_ad as _forward_ad

from . import _C  # noqa: F401  (registers torch.ops.flash_cuda)


def accumulation_dtype(dtype):
    """dtype of lse and of the internal accumulators: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _unit_last_stride(x):
    # Mirrors csrc/ops.cpp: kernels need stride(-1) == 1, anything else is copied once.
    return x if x.stride(-1) == 1 else x.contiguous()


def _empty_like_unit_stride(x):
    # Mirrors csrc/empty_like.h: x's layout with unit stride in D (a self-overlapping x, whose
    # empty_like may order another dim innermost, gets a contiguous tensor).
    y = torch.empty_like(x)
    return y if y.shape[-1] <= 1 or y.stride(-1) == 1 else x.new_empty(x.shape)


def _on_device_of(q, _ref="q", **tensors):
    """The C++ ops' device check, in their fake kernels: an op given a meta tensor among real ones
    dispatches to the fake kernel (Meta outranks CPU and CUDA), which would otherwise return
    uninitialised real tensors; under FakeTensorMode every tensor keeps its device."""
    for name, x in tensors.items():
        if isinstance(x, torch.Tensor) and x.device != q.device:
            raise RuntimeError(f"flash_cuda: {name} must be on {_ref}'s device ({q.device}), got {x.device}")


@torch.library.register_fake("flash_cuda::fwd")
def _fwd_fake(q, k, v, scale, causal, bottom_right, deterministic=False, window_left=-1, window_right=-1,
              softcap=0.0, alibi_slopes=None, bias=None, dropout_p=0.0, rng_state=None):
    _on_device_of(q, k=k, v=v, alibi_slopes=alibi_slopes, bias=bias, rng_state=rng_state if dropout_p > 0 else None)
    out = _empty_like_unit_stride(_unit_last_stride(q))
    lse = q.new_empty(q.shape[:3], dtype=accumulation_dtype(q.dtype))
    return out, lse


@torch.library.register_fake("flash_cuda::bwd")
def _bwd_fake(dout, q, k, v, out, lse, dlse, scale, causal, bottom_right, deterministic=False, window_left=-1,
              window_right=-1, softcap=0.0, alibi_slopes=None, bias=None, bias_grad=False, dropout_p=0.0,
              rng_state=None):
    _on_device_of(q, dout=dout, k=k, v=v, out=out, lse=lse, dlse=dlse, alibi_slopes=alibi_slopes, bias=bias,
                  rng_state=rng_state if dropout_p > 0 else None)
    dq, dk, dv = (_empty_like_unit_stride(_unit_last_stride(x)) for x in (q, k, v))
    acc = accumulation_dtype(q.dtype)
    B, H, Nq, Nk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    if not (bias_grad and bias is not None):
        dbias = q.new_empty((0,), dtype=acc)
    else:  # as both backends return it (one layout: a compiled graph must not depend on emulate())
        # written transposed, [B][Hq][Nk][Nq rounded up to 8]
        dbias = q.new_empty((B, H, Nk, (Nq + 7) // 8 * 8), dtype=acc)[..., :Nq].transpose(2, 3)
    return dq, dk, dv, dbias


def _schema_names(op):
    """The op's argument names, in its schema's order (csrc/ops.cpp)."""
    return [a.name for a in op.default._schema.arguments]


def _unpacked_as(op, names):
    """The argument order the autograd functions below unpack positionally, checked against the
    op's schema at import: a schema changed in ops.cpp alone fails here, naming the op, rather
    than as gradients returned for the wrong arguments. -> the number of arguments."""
    if _schema_names(op) != names:
        raise ImportError(f"flash_cuda: the schema of {op} has the arguments {_schema_names(op)}, but ops.py "
                          f"unpacks {names}")
    return len(names)


_FWD_INPUTS = _unpacked_as(torch.ops.flash_cuda.fwd, [
    "q", "k", "v", "scale", "causal", "bottom_right", "deterministic", "window_left", "window_right", "softcap",
    "alibi_slopes", "bias", "dropout_p", "rng_state"])
_BIAS = _schema_names(torch.ops.flash_cuda.fwd).index("bias")
_unpacked_as(torch.ops.flash_cuda.bwd, [
    "dout", "q", "k", "v", "out", "lse", "dlse", "scale", "causal", "bottom_right", "deterministic", "window_left",
    "window_right", "softcap", "alibi_slopes", "bias", "bias_grad", "dropout_p", "rng_state"])


def _forward_ad_error(fn, name):
    return NotImplementedError(
        f"{fn}: forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) is not supported: {name} has a "
        "tangent, which the kernels would drop; use reverse mode (backward(), torch.func.grad / vjp) or "
        "torch's math attention (torch.nn.attention.sdpa_kernel(SDPBackend.MATH)) for forward-mode AD")


def refuse_forward_ad(fn, names, inputs):
    """Forward-mode AD (torch.func.jvp, torch.autograd.forward_ad's dual tensors) has no formula in
    flash_cuda: without this a tangent was dropped and jvp returned zeros. NotImplementedError, as
    torch SDPA's fused kernels raise; reverse mode (backward, torch.func.grad / vjp) works. A
    vmap-wrapped input cannot be looked at (no batching rule): there TransformFunction's jvp
    raises instead."""
    if _forward_ad._current_level < 0:  # no dual level entered: no input has a tangent
        return
    for name, x in zip(names, inputs):
        if not isinstance(x, torch.Tensor):
            continue
        try:
            tangent = _forward_ad.unpack_dual(x).tangent
        except RuntimeError:  # a vmap-wrapped tensor
            if not torch._C._are_functorch_transforms_active():
                raise
            continue
        if tangent is not None:
            raise _forward_ad_error(fn, name)


_FUNCTIONALIZE = torch._C._functorch.TransformType.Functionalize


def _below_autograd(op):
    """op called below autograd, for calls that build no graph (the caller has decided): as
    torch.library's autograd layer does in its no-grad path, without that layer, which is Python
    (about 5 us a call on an AMD Zen 4 core)."""

    def call(*inputs):
        with torch._C._AutoDispatchBelowAutograd():
            return op(*inputs)

    return call


def _argument_names(op):
    """The op's argument names as the API calls them (the fwd op's bias is attention's attn_mask)."""
    return ["attn_mask" if a.name == "bias" else a.name for a in op.default._schema.arguments]


def _tensor_positions(op):
    """Indices of the op's Tensor and Tensor? arguments (the only ones that can require grad)."""
    def is_tensor(t):
        return isinstance(t, torch.TensorType) or (
            isinstance(t, torch.OptionalType) and isinstance(t.getElementType(), torch.TensorType))
    return tuple(i for i, a in enumerate(op.default._schema.arguments) if is_tensor(a.type))


def _needs_graph(inputs, positions):
    if not torch.is_grad_enabled():
        return False
    for i in positions:  # (a loop over 14 to 19 arguments took ~2 us a call)
        x = inputs[i]
        if x is not None and x.requires_grad:
            return True
    return False


def _setup_context(ctx, inputs, output):
    q, k, v = inputs[:3]
    out, lse = output
    inputs = list(inputs) + [None] * (_FWD_INPUTS - len(inputs))
    scale, causal, bottom_right, deterministic, wl, wr, softcap, alibi, bias, dropout_p, rng_state = inputs[3:]
    ctx.save_for_backward(q, k, v, out, lse, alibi, bias, rng_state)
    ctx.args = (scale, causal, bottom_right, bool(deterministic) if deterministic is not None else False,
                -1 if wl is None else wl, -1 if wr is None else wr, 0.0 if softcap is None else softcap)
    ctx.dropout_p = 0.0 if dropout_p is None else dropout_p
    # An output without a gradient (lse, mostly) comes to backward as None, which the ops take,
    # rather than a tensor of zeros made and subtracted (as in _eager_autograd's Functions).
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, alibi, bias, rng_state = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    bias_grad = bias is not None and ctx.needs_input_grad[_BIAS]
    dq, dk, dv, dbias = _bwd(dout, q, k, v, out, lse, dlse, *ctx.args, alibi, bias, bias_grad, ctx.dropout_p,
                             rng_state)
    return (dq, dk, dv) + (None,) * (_BIAS - 3) + (dbias if bias_grad else None,) + (None,) * (_FWD_INPUTS - _BIAS - 1)


torch.library.register_autograd("flash_cuda::fwd", _backward, setup_context=_setup_context)


@torch.library.register_fake("flash_cuda::varlen_fwd")
def _varlen_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal,
                     deterministic=False, window_left=-1, window_right=-1, softcap=0.0, alibi_slopes=None,
                     dropout_p=0.0, rng_state=None):
    _on_device_of(q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, alibi_slopes=alibi_slopes,
                  rng_state=rng_state if dropout_p > 0 else None)
    out = q.new_empty(q.shape)  # contiguous (total, H, D) on every path, whatever q's layout
    lse = q.new_empty((q.shape[1], q.shape[0]), dtype=accumulation_dtype(q.dtype))
    return out, lse


@torch.library.register_fake("flash_cuda::varlen_bwd")
def _varlen_bwd_fake(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                     causal, deterministic=False, window_left=-1, window_right=-1, softcap=0.0, alibi_slopes=None,
                     dropout_p=0.0, rng_state=None):
    _on_device_of(q, dout=dout, k=k, v=v, out=out, lse=lse, dlse=dlse, cu_seqlens_q=cu_seqlens_q,
                  cu_seqlens_k=cu_seqlens_k, alibi_slopes=alibi_slopes, rng_state=rng_state if dropout_p > 0 else None)
    return tuple(x.new_empty(x.shape) for x in (q, k, v))  # contiguous, as the forward's out


_VARLEN_FWD_INPUTS = _unpacked_as(torch.ops.flash_cuda.varlen_fwd, [
    "q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "scale", "causal", "deterministic",
    "window_left", "window_right", "softcap", "alibi_slopes", "dropout_p", "rng_state"])
_unpacked_as(torch.ops.flash_cuda.varlen_bwd, [
    "dout", "q", "k", "v", "out", "lse", "dlse", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k",
    "scale", "causal", "deterministic", "window_left", "window_right", "softcap", "alibi_slopes", "dropout_p",
    "rng_state"])


def _varlen_setup_context(ctx, inputs, output):
    inputs = list(inputs) + [None] * (_VARLEN_FWD_INPUTS - len(inputs))
    q, k, v, cu_q, cu_k = inputs[:5]
    out, lse = output
    alibi, dropout_p, rng_state = inputs[13:16]
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, alibi, rng_state)
    max_q, max_k, scale, causal, deterministic, wl, wr, softcap = inputs[5:13]
    ctx.args = (max_q, max_k, scale, causal, bool(deterministic) if deterministic is not None else False,
                -1 if wl is None else wl, -1 if wr is None else wr, 0.0 if softcap is None else softcap)
    ctx.dropout_p = 0.0 if dropout_p is None else dropout_p
    ctx.set_materialize_grads(False)  # (as _setup_context)


def _varlen_backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k, alibi, rng_state = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = _varlen_bwd(dout, q, k, v, out, lse, dlse, cu_q, cu_k, *ctx.args, alibi, ctx.dropout_p, rng_state)
    return (dq, dk, dv) + (None,) * (_VARLEN_FWD_INPUTS - 3)


torch.library.register_autograd("flash_cuda::varlen_fwd", _varlen_backward, setup_context=_varlen_setup_context)


def _vmap_rule(op, batch_args, alibi_arg, dropout_arg, run=None):
    """A torch.func.vmap rule for op (fwd, bwd): the vmapped dim folded into the batch dim of the
    (B, ...) tensors at batch_args (unbatched ones expanded; the ALiBi slopes, (Hq,) or (B, Hq),
    to (V B, Hq)), one call, the outputs unfolded. Without a rule torch looped over the slices
    behind a warning, and jvp(vmap(attention)) failed in torch's own code rather than with
    flash_cuda's forward-AD error (audit). With dropout each slice is a call of its own: the mask
    is a function of the batch index, which folding would renumber (vmap's randomness="same"
    means one mask for every slice). run (default op): what the rule calls, below the vmap level;
    fwd's is the eager wrapper, whose Function carries the gradient to a transform outside the
    vmap (grad(vmap(attention))), which the op's own autograd wrapper cannot (torch.func refuses
    a Function without setup_context: an audit)."""
    run = op if run is None else run

    def by_slices(info, in_dims, args):
        outs = [run(*[a.select(d, i) if d is not None else a for a, d in zip(args, in_dims)])
                for i in range(info.batch_size)]
        return tuple(torch.stack(o) for o in zip(*outs)), (0,) * len(outs[0])

    defaults = [a.default_value for a in op._schema.arguments]

    def rule(info, in_dims, *args):
        args, in_dims = args + tuple(defaults[len(args):]), tuple(in_dims) + (None,) * (len(defaults) - len(args))
        if args[dropout_arg] > 0 and info.batch_size > 0:
            return by_slices(info, in_dims, args)
        V, x, d = info.batch_size, args[batch_args[0]], in_dims[batch_args[0]]
        B = x.shape[0] if d is None else x.movedim(d, 0).shape[1]
        folded = list(args)
        if V == 0:  # no slice: no mask to draw (a state per slice would be (0, 2), which the op refuses)
            folded[dropout_arg], folded[dropout_arg + 1] = 0.0, None
        for i in batch_args:
            x, d = args[i], in_dims[i]
            if x is not None:
                x = x.movedim(d, 0) if d is not None else x.expand(V, *x.shape)
                folded[i] = x.reshape(V * B, *x.shape[2:])
        slopes, d = args[alibi_arg], in_dims[alibi_arg]
        if slopes is not None and (d is not None or slopes.dim() == 2):
            slopes = slopes.movedim(d, 0) if d is not None else slopes.expand(V, *slopes.shape)
            folded[alibi_arg] = slopes.reshape(V, -1, slopes.shape[-1]).expand(V, B, slopes.shape[-1]).reshape(
                V * B, slopes.shape[-1])
        outs = run(*folded)
        # (an empty output, bwd's dbias without a bias gradient, is the same for every slice)
        return (tuple(o.reshape(V, B, *o.shape[1:]) if o.dim() > 1 else o for o in outs),
                tuple(0 if o.dim() > 1 else None for o in outs))

    return rule


def _vmap_rule_of(op, batch_args, run=None):
    """_vmap_rule with the positions of batch_args, alibi_slopes and dropout_p in op's schema."""
    names = _schema_names(op)
    return _vmap_rule(op.default, tuple(names.index(n) for n in batch_args), names.index("alibi_slopes"),
                      names.index("dropout_p"), run)


_FWD_BATCH_ARGS = ("q", "k", "v", "bias")
_fwd_vmap = _vmap_rule_of(torch.ops.flash_cuda.fwd, _FWD_BATCH_ARGS)
_bwd_vmap = _vmap_rule_of(torch.ops.flash_cuda.bwd, ("dout", "q", "k", "v", "out", "lse", "dlse", "bias"))
torch.library.register_vmap("flash_cuda::fwd", _fwd_vmap)
torch.library.register_vmap("flash_cuda::bwd", _bwd_vmap)


def _eager_autograd(op, n_inputs, setup_context, backward, vmap_rule=None):
    """`op` for api.py's calls (and the backward ops for the backwards): below autograd when the
    call builds no graph, else the same setup_context and backward as its registration in an
    autograd.Function of our own. torch.library's autograd wrapper fills in the op's default
    arguments on every call that builds one (torch._library.utils.fill_defaults reads
    op._schema.arguments, which builds a new list, once per argument): about 90 us a call for
    fwd's 14 arguments on an AMD Zen 4 core, time a GPU waits for at short sequences. A tangent
    (forward-mode AD) on any input raises. torch.compile, torch.jit.trace, opcheck and direct op
    calls keep the registration."""

    no_grad_op = _below_autograd(op)

    class EagerFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            output = no_grad_op(*inputs)  # (grad mode is off in here)
            setup_context(ctx, inputs, output)
            # An output without a gradient (lse, mostly) comes to backward as None, which the ops
            # take, rather than a tensor of zeros made and subtracted on every backward.
            ctx.set_materialize_grads(False)
            return output

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    # Under torch.func's transforms (grad, vjp, jacrev, vmap, functionalize), which take only
    # Functions with a separate setup_context; such a Function's apply binds its arguments through
    # inspect.signature on every call (about 30 us), hence EagerFunction everywhere else.
    class TransformFunction(torch.autograd.Function):
        # vmap_rule where the op has one (one call for every slice); else torch's generated rule
        # (a loop over the slices)
        generate_vmap_rule = vmap_rule is None

        @staticmethod
        def forward(*inputs):
            return no_grad_op(*inputs)

        if vmap_rule is not None:
            @staticmethod
            def vmap(info, in_dims, *inputs):
                # under jvp(vmap(...)) the inputs come here unwrapped to the jvp's level, where a
                # tangent shows (call could not see it through the vmap wrappers)
                refuse_forward_ad("flash_cuda", names, inputs)
                return vmap_rule(info, in_dims, *inputs)

        @staticmethod
        def setup_context(ctx, inputs, output):
            setup_context(ctx, inputs, output)
            ctx.set_materialize_grads(False)  # (as EagerFunction)

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

        @staticmethod
        def jvp(ctx, *tangents):  # (where the check in call could not see the tangent: under vmap)
            raise _forward_ad_error("flash_cuda", "an input")

    names, positions = _argument_names(op), _tensor_positions(op)

    def call(*inputs):
        assert len(inputs) == n_inputs  # the backward returns one gradient per input of the op
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return op(*inputs)  # (torch.jit.trace records a Function as a PythonOp it cannot save)
        refuse_forward_ad("flash_cuda", names, inputs)
        # Under a transform always: a wrapped tensor (vmap, functionalize) hides whether the tensor
        # it wraps requires grad, so _needs_graph could not tell, and a graph the caller needs
        # around the transform would be lost below autograd.
        if torch._C._are_functorch_transforms_active():
            if torch._C._functorch.peek_interpreter_stack().key() == _FUNCTIONALIZE:
                return op(*inputs)  # (no functionalize rule for a Function: the registration's path)
            return TransformFunction.apply(*inputs)
        if _needs_graph(inputs, positions):
            return EagerFunction.apply(*inputs)
        return no_grad_op(*inputs)

    return call


# Two rules for fwd: the op's own (registered above: the raw op under vmap, as torch.compile,
# functionalize and direct calls reach it) calls the op; the eager wrapper's calls the wrapper,
# whose Function carries the gradient to a transform outside the vmap. Calling the wrapper from
# the op's rule failed where no Function may run (vmap of the raw op, vmap of functionalize,
# compiled vmap: a review).
fwd = _eager_autograd(torch.ops.flash_cuda.fwd, _FWD_INPUTS, _setup_context, _backward,
                      _vmap_rule_of(torch.ops.flash_cuda.fwd, _FWD_BATCH_ARGS, run=lambda *args: fwd(*args)))
varlen_fwd = _eager_autograd(torch.ops.flash_cuda.varlen_fwd, _VARLEN_FWD_INPUTS, _varlen_setup_context,
                             _varlen_backward)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("flash_cuda: gradients of its gradients (double backward, create_graph=True and a second "
                       "backward through them) are not supported; for second derivatives use torch's math "
                       "attention (torch.nn.attention.sdpa_kernel(SDPBackend.MATH))")


# The backward ops' own autograd: without one, autograd's fallback treats them as constants and a
# second derivative through them came out as silent zeros. They raise when differentiated, as torch
# SDPA's fused kernels do.
for _op in ("flash_cuda::bwd", "flash_cuda::varlen_bwd"):
    torch.library.register_autograd(_op, _no_double_backward)

# The backward ops as the backwards above call them: below autograd when no graph is needed;
# when one is (create_graph=True, and torch.func.grad, whose backward always builds one), through
# a Function of ours whose backward raises as the registration's does (torch.library's own
# wrapper is an autograd.Function that torch.func's transforms refuse).
_bwd, _varlen_bwd = (_eager_autograd(op, len(op.default._schema.arguments), lambda ctx, inputs, output: None,
                                     _no_double_backward, rule)
                     for op, rule in ((torch.ops.flash_cuda.bwd, _bwd_vmap), (torch.ops.flash_cuda.varlen_bwd, None)))


@torch.library.register_fake("flash_cuda::philox_state")
def _philox_state_fake(like, nk, inputs, generator=None):
    return like.new_empty((2,), dtype=torch.int64)


def _philox_state_vmap(info, in_dims, like, nk, inputs, generator=None):
    """philox_state under vmap (run when like or any of inputs is batched), by vmap's `randomness`:
    one state for every slice ("same"), one for each ("different"), torch's error ("error").
    Without a rule torch's fallback drew a state per slice whatever `randomness` said (audit:
    under torch.compile; eager vmap draws its seed with torch.randint, api._rng_state)."""
    if info.randomness == "error":
        raise RuntimeError("vmap: called random operation while in randomness error mode. Please either use the "
                           "'same' or 'different' randomness flags on vmap or perform the randomness operation "
                           "out of vmap")
    d = in_dims[0]
    one = like if d is None else like.movedim(d, 0)[:1]  # (like gives the device alone; [:1]: batch 0 too)
    if info.randomness == "same":
        return torch.ops.flash_cuda.philox_state(one, nk, [], generator), None
    states = [torch.ops.flash_cuda.philox_state(one, nk, [], generator) for _ in range(info.batch_size)]
    return (torch.stack(states) if states else one.new_empty((0, 2), dtype=torch.int64)), 0


torch.library.register_vmap("flash_cuda::philox_state", _philox_state_vmap)


@torch.library.register_fake("flash_cuda::dropout_mask")
def _dropout_mask_fake(rng_state, dropout_p, batch, heads, nq, nk, cu_seqlens_q=None, cu_seqlens_k=None):
    _on_device_of(rng_state, "rng_state", cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    return rng_state.new_empty((batch, heads, nq, nk), dtype=torch.bool)


def _dropout_mask_vmap(info, in_dims, rng_state, dropout_p, batch, heads, nq, nk, *cu_seqlens):
    """dropout_mask under vmap: each slice's mask from its own state (one per slice under
    randomness="different"), stacked; without a rule torch's fallback did so behind a warning."""
    args = (rng_state, dropout_p, batch, heads, nq, nk) + cu_seqlens
    masks = [torch.ops.flash_cuda.dropout_mask(*(a.select(d, i) if d is not None else a
                                                 for a, d in zip(args, in_dims)))
             for i in range(info.batch_size)]
    return (torch.stack(masks) if masks else rng_state.new_empty((0, batch, heads, nq, nk), dtype=torch.bool)), 0


torch.library.register_vmap("flash_cuda::dropout_mask", _dropout_mask_vmap)


@torch.library.register_fake("flash_cuda::kvcache_fwd")
def _kvcache_fwd_fake(q, k_cache, v_cache, k, v, cache_seqlens, block_table, scale, causal, window_left=-1,
                      window_right=-1, softcap=0.0, alibi_slopes=None, num_splits=0, cache_leftpad=None):
    _on_device_of(q, k_cache=k_cache, v_cache=v_cache, k=k, v=v, cache_seqlens=cache_seqlens, block_table=block_table,
                  alibi_slopes=alibi_slopes, cache_leftpad=cache_leftpad)
    out = q.new_empty(q.shape)
    lse = q.new_empty(q.shape[:3], dtype=accumulation_dtype(q.dtype))
    return out, lse
