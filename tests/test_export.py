"""Tracing paths besides torch.compile's default: torch.export (strict and non-strict) with
dynamic sizes passed as arguments, torch.compile with a data-dependent max_seqlen and without
recompiling per total length, torch.jit.trace of a module with parameters, and fake-tensor
tracing (FakeTensorMode, make_fx). Each compares against eager or the float64 reference."""
import io

import pytest
import torch
from torch.export import Dim

import flash_cuda
from flash_cuda import bert_padding, flash_attn_interface
from reference import assert_close_fp, attention_ref


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class Window(torch.nn.Module):
    def forward(self, q, k, v):
        return flash_cuda.attention(q, k, v, window=(q.shape[2] // 2, 0))


class Packed(torch.nn.Module):
    def forward(self, q, k, v, cu):
        return flash_cuda.varlen_attention(q, k, v, cu, cu, q.shape[0], k.shape[0], causal=True)


class Pad(torch.nn.Module):
    def forward(self, x_unpad, indices, x):
        return bert_padding.pad_input(x_unpad, indices, x.shape[0], x.shape[1])


class Decode(torch.nn.Module):
    def forward(self, q, k_cache, v_cache):
        return flash_cuda.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=k_cache.shape[2] - 1)


@pytest.mark.parametrize("strict", [False, True])
def test_export_with_sizes_of_dynamic_dims_as_arguments(strict):
    """Sizes of dynamic dimensions passed as int arguments (a window from the sequence length,
    max_seqlen from the token count, pad_input's batch and seqlen, cache_seqlens from the cache)
    stay symbolic: non-strict export passes them as torch.SymInt, which every check refused
    (TypeError), and strict export specialised max_seqlen and the window to one value (the ops
    took plain ints). The exported program, run at other sizes, matches eager."""
    S, T, C = Dim("S", min=4, max=512), Dim("T", min=8, max=4096), Dim("C", min=4, max=512)
    cu = lambda t: torch.tensor([0, 3, t], dtype=torch.int32)  # noqa: E731
    cases = [(Window(), lambda n: tuple(rand(1, 2, n, 16, seed=i) for i in range(3)), ({2: S},) * 3),
             (Packed(), lambda n: (rand(n, 4, 16), rand(n, 2, 16, seed=1), rand(n, 2, 16, seed=2), cu(n)),
              ({0: T},) * 3 + (None,)),
             (Pad(), lambda n: (rand(5, 8), torch.tensor([0, 1, 2, n, n + 1]), rand(2, n, 8)), (None, None, {1: S})),
             (Decode(), lambda n: (rand(2, 4, 1, 16), rand(2, 2, n, 16, seed=1), rand(2, 2, n, 16, seed=2)),
              (None, {2: C}, {2: C}))]
    for module, make, dynamic_shapes in cases:
        program = torch.export.export(module, make(12), dynamic_shapes=dynamic_shapes, strict=strict)
        for n in (9, 40):
            args = make(n)
            torch.testing.assert_close(program.module()(*args), module(*args), rtol=0, atol=0)


class DataMax(torch.nn.Module):
    def __init__(self, fa2):
        super().__init__()
        self.fa2 = fa2

    def forward(self, q, k, v, cu):
        longest = (cu[1:] - cu[:-1]).max()  # a 0-d tensor, as varlen_attention's docstring allows
        if self.fa2:
            return flash_attn_interface.flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, causal=True)
        return flash_cuda.varlen_attention(q, k, v, cu, cu, longest, longest, causal=True)


@pytest.mark.parametrize("fa2", [False, True])
@pytest.mark.parametrize("strict", [False, True])
def test_export_with_a_data_dependent_max_seqlen(strict, fa2):
    """max_seqlen as a 0-d tensor computed from cu_seqlens in the exported code, through
    varlen_attention and FlashAttention's flash_attn_varlen_func (no window): non-strict export
    raised (int() of the tensor asked for a concrete value of a data-dependent one: an audit),
    and flash_attn_varlen_func in both modes (its window normalisation compared against it: a
    review). The program matches eager at other lengths."""
    q, k, v = rand(10, 4, 8), rand(10, 2, 8, seed=1), rand(10, 2, 8, seed=2)
    module = DataMax(fa2)
    program = torch.export.export(module, (q, k, v, torch.tensor([0, 3, 10], dtype=torch.int32)), strict=strict)
    for lengths in ([0, 6, 10], [0, 1, 10], [0, 10, 10]):
        cu = torch.tensor(lengths, dtype=torch.int32)
        torch.testing.assert_close(program.module()(q, k, v, cu), module(q, k, v, cu), rtol=0, atol=0)


def test_window_from_a_size_against_the_reference():
    """The exported window (q.shape[2] // 2 left, 0 right) is the window of each size, not of the
    size it was exported at: against the float64 reference at two other sizes."""
    program = torch.export.export(Window(), tuple(rand(1, 2, 16, 8, seed=i) for i in range(3)),
                                  dynamic_shapes=({2: Dim("S", min=4, max=256)},) * 3, strict=False)
    for n in (10, 33):
        q, k, v = (rand(1, 2, n, 8, seed=i) for i in range(3))
        ref, _ = attention_ref(q.double(), k.double(), v.double(), window=(n // 2, 0))
        assert_close_fp("out", program.module()(q, k, v), ref)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_with_a_data_dependent_max_seqlen(backend):
    """FlashAttention's usual max_seqlen = (cu[1:] - cu[:-1]).max().item() (or a 0-d tensor)
    compiles fullgraph with capture_scalar_outputs: the range check guarded on the data (dynamo's
    "Could not guard on data-dependent expression") and the op took only plain ints."""
    cu = torch.tensor([0, 4, 13, 20], dtype=torch.int32)
    q, k, v = rand(20, 4, 16), rand(20, 2, 16, seed=1), rand(20, 2, 16, seed=2)

    def by_item(q, k, v, cu):
        m = int((cu[1:] - cu[:-1]).max())
        return flash_cuda.varlen_attention(q, k, v, cu, cu, m, m, causal=True)

    def by_tensor(q, k, v, cu, m):
        return flash_cuda.varlen_attention(q, k, v, cu, cu, m, m, causal=True)

    eager = by_item(q, k, v, cu)
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        for f, args in ((by_item, (q, k, v, cu)), (by_tensor, (q, k, v, cu, torch.tensor(9)))):
            torch._dynamo.reset()
            torch.testing.assert_close(torch.compile(f, fullgraph=True, backend=backend)(*args), eager,
                                       rtol=0, atol=0)


def test_compile_does_not_recompile_per_total_length():
    """torch.compile(dynamic=True) of varlen attention with max_seqlen from the token count, and of
    the SDPA drop-in on jagged nested tensors: one graph for every total (the ops took plain
    ints, so each new total was a new graph, up to dynamo's recompile limit)."""
    from torch._dynamo.testing import CompileCounter

    def packed(q, k, v, cu):
        return flash_cuda.varlen_attention(q, k, v, cu, cu, q.shape[0], k.shape[0], causal=True)

    def jagged(q, k, v):
        t = (lambda x: x.transpose(1, 2))  # noqa: E731
        return t(flash_cuda.scaled_dot_product_attention(t(q), t(k), t(v)))

    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(packed, fullgraph=True, dynamic=True, backend=counter)
    for total in (20, 33, 47):
        args = (rand(total, 4, 16), rand(total, 2, 16, seed=1), rand(total, 2, 16, seed=2),
                torch.tensor([0, 5, total - 3, total], dtype=torch.int32))
        torch.testing.assert_close(compiled(*args), packed(*args), rtol=0, atol=0)
    assert counter.frame_count == 1
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(jagged, fullgraph=True, dynamic=True, backend=counter)
    for i, lengths in enumerate(([3, 7, 5], [4, 6, 9], [2, 2, 30])):
        x = torch.nested.nested_tensor([rand(n, 4, 16, seed=i) for n in lengths], layout=torch.jagged)
        for ours, theirs in zip(compiled(x, x, x).unbind(), jagged(x, x, x).unbind()):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert counter.frame_count == 1


def test_jit_trace_of_a_module_with_parameters():
    """torch.jit.trace of a module whose inputs to attention require grad (a Linear before it):
    the trace recorded flash_cuda's Python autograd.Function, which failed the trace check
    ("Graphs differed across invocations") and could not be saved. Now the op is traced; the
    saved and reloaded module gives eager's output and gradients."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(16, 16)

        def forward(self, q, k, v):
            return flash_cuda.attention(self.proj(q), k, v, causal=True)

    torch.manual_seed(0)
    module = Block()
    args = tuple(rand(1, 2, 8, 16, seed=i) for i in range(3))
    traced = torch.jit.trace(module, args)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    outs = []
    for m in (module, loaded):
        m.zero_grad()
        out = m(*args)
        out.pow(2).sum().backward()
        outs.append((out, [p.grad.clone() for p in m.parameters()]))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=0, atol=0)
    for a, b in zip(outs[1][1], outs[0][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fake_tensor_tracing_of_varlen_and_kvcache():
    """Under FakeTensorMode and make_fx's fake and symbolic tracing, varlen attention and the KV
    cache skip their host reads of CPU values (fake tensors hold none: DataDependentOutputException
    before), as they do under torch.compile; the traced graphs run equal to eager."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    def packed(q, k, v, cu):
        return flash_cuda.varlen_attention(q, k, v, cu, cu, 5, 5)

    def decode(q, k_cache, v_cache, lengths):
        return flash_cuda.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths)

    cases = ((packed, (rand(9, 4, 16), rand(9, 2, 16, seed=1), rand(9, 2, 16, seed=2),
                       torch.tensor([0, 4, 9], dtype=torch.int32)), (9, 4, 16)),
             (decode, (rand(2, 4, 1, 16), rand(2, 2, 64, 16, seed=1), rand(2, 2, 64, 16, seed=2),
                       torch.tensor([3, 4], dtype=torch.int32)), (2, 4, 1, 16)))
    for f, args, shape in cases:
        with FakeTensorMode() as mode:
            assert tuple(f(*(mode.from_tensor(x) for x in args)).shape) == shape
        for tracing_mode in ("fake", "symbolic"):
            graph = make_fx(f, tracing_mode=tracing_mode)(*args)
            torch.testing.assert_close(graph(*args), f(*args), rtol=0, atol=0)


def test_unpad_compiles_without_graph_breaks_and_keeps_its_mask_check():
    """unpad_input with a float 0/1 mask under torch.compile (with dynamo's capture of scalars and
    of data-dependent shapes, as FlashAttention's unpadding needs): the check that the mask is a
    padding mask read the data on the host, two graph breaks; now it runs in the graph and still
    refuses an additive mask."""
    x = rand(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float32)

    def f(x, mask):
        return bert_padding.unpad_input(x, mask)[0]

    with torch._dynamo.config.patch(capture_scalar_outputs=True, capture_dynamic_output_shape_ops=True):
        torch._dynamo.reset()
        assert torch._dynamo.explain(f)(x, mask).graph_break_count == 0
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(f, fullgraph=True)(x, mask), f(x, mask), rtol=0, atol=0)
        torch._dynamo.reset()
        with pytest.raises(RuntimeError, match="attention_mask must be a padding mask"):
            torch.compile(f, fullgraph=True)(x, (mask - 1) * 1e9)


def test_concatenated_sequences_compile_and_keep_their_check():
    """unpad_input_for_concatenated_sequences under torch.compile(fullgraph=True) (with dynamo's
    capture of scalars and data-dependent shapes): it branched on how many sequences there were,
    which no graph could trace; bad lengths were not checked there (decreasing cu_seqlens, or ones
    past the rows, silently: an audit's finding), now they fail as the graph runs."""
    x = rand(2, 5, 8)
    lengths = torch.tensor([[2, 3, 0, 0, 0], [1, 1, 0, 0, 0]])
    f = bert_padding.unpad_input_for_concatenated_sequences
    with torch._dynamo.config.patch(capture_scalar_outputs=True, capture_dynamic_output_shape_ops=True):
        torch._dynamo.reset()
        got, want = torch.compile(f, fullgraph=True)(x, lengths), f(x, lengths)
        assert all(torch.equal(a, b) for a, b in zip(got[:3], want[:3])) and got[3] == want[3] == 3
        for bad in ([[2, -1, 3, 0, 0], [1, 1, 0, 0, 0]], [[3, 4, 0, 0, 0], [1, 1, 0, 0, 0]]):
            torch._dynamo.reset()
            with pytest.raises(RuntimeError, match="attention_mask_in_length must hold non-negative lengths whose "
                                                   "sum per row is at most S"):
                torch.compile(f, fullgraph=True)(x, torch.tensor(bad))


def test_aot_inductor_package(tmp_path):
    """An exported program with a dynamic sequence length, compiled by AOTInductor into a package
    (the op called from the generated C++), loaded and run at another length: eager's output."""

    class Causal(torch.nn.Module):
        def forward(self, q, k, v):
            return flash_cuda.attention(q, k, v, causal=True)

    program = torch.export.export(Causal(), tuple(rand(1, 2, 16, 16, seed=i) for i in range(3)),
                                  dynamic_shapes=({2: Dim("S", min=2, max=512)},) * 3)
    path = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "causal.pt2"))
    loaded = torch._inductor.aoti_load_package(path)
    args = tuple(rand(1, 2, 40, 16, seed=3 + i) for i in range(3))
    torch.testing.assert_close(loaded(*args), Causal()(*args), rtol=0, atol=0)
