"""Autograd, dispatcher and compiler integration: gradcheck in float64 (also through lse),
opcheck of both ops, torch.compile(fullgraph=True) forward and backward, determinism."""
import pytest
import torch

import flash_cuda
from conftest import load_benchmark, skip_unless_supported, widest_dtype
from reference import assert_close_fp, attention_ref


def rand(*shape, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(device, dtype)


@pytest.mark.parametrize("Hq,Hkv,Nq,Nk,causal", [
    (2, 2, 7, 7, False), (2, 2, 7, 7, True), (4, 2, 5, 9, True), (3, 1, 9, 5, True), (2, 2, 6, 11, False),
])
def test_gradcheck_float64(Hq, Hkv, Nq, Nk, causal):
    """Gradients of out and of lse (which the FlashAttention backward gets via D - dlse)."""
    q = rand(2, Hq, Nq, 6, seed=1).requires_grad_()
    k = rand(2, Hkv, Nk, 6, seed=2).requires_grad_()
    v = rand(2, Hkv, Nk, 6, seed=3).requires_grad_()

    def f(q, k, v):
        out, lse = flash_cuda.attention(q, k, v, causal=causal, return_lse=True)
        return out, lse.masked_fill(torch.isinf(lse), 0.0)  # rows without keys: lse = -inf

    assert torch.autograd.gradcheck(f, (q, k, v))


@pytest.mark.parametrize("packed", [False, True])
def test_eager_calls_skip_torch_librarys_autograd_wrapper(monkeypatch, packed):
    """An eager call with gradients goes through flash_cuda's own autograd.Function (ops.py,
    _eager_autograd), not torch.library's wrapper, whose fill_defaults cost about 90 us a call;
    the gradients (through out, lse, a float mask and ALiBi slopes) equal, bitwise, those of the
    op's registered formula (the direct op call), and torch.compile still traces the op."""
    import torch._library.utils as library_utils
    calls = []
    fill = library_utils.fill_defaults
    monkeypatch.setattr(library_utils, "fill_defaults", lambda *a: calls.append(1) or fill(*a))
    q, k, v = (rand(*shape, dtype=torch.float32, seed=i).requires_grad_()
               for i, shape in enumerate([(1, 4, 9, 16), (1, 2, 13, 16), (1, 2, 13, 16)]))
    slopes = torch.rand(4, generator=torch.Generator().manual_seed(5))
    if packed:
        cu = torch.tensor([0, 4, 9], dtype=torch.int32), torch.tensor([0, 6, 13], dtype=torch.int32)
        flat = lambda x: x[0].transpose(0, 1)  # (1, H, N, D) -> (N, H, D)
        args = (flat(q), flat(k), flat(v), *cu, 5, 7, 0.3, True, False, -1, -1, 0.0, slopes[None], 0.0, None)
        api = lambda: flash_cuda.varlen_attention(flat(q), flat(k), flat(v), *cu, 5, 7, scale=0.3, causal=True,
                                                  alibi_slopes=slopes, return_lse=True)
        op = torch.ops.flash_cuda.varlen_fwd
    else:
        mask = rand(1, 4, 9, 13, dtype=torch.float32, seed=7).requires_grad_()
        args = (q, k, v, 0.3, True, True, False, -1, -1, 0.0, slopes[None], mask, 0.0, None)
        api = lambda: flash_cuda.attention(q, k, v, scale=0.3, causal=True, alibi_slopes=slopes, attn_mask=mask,
                                           return_lse=True)
        op = torch.ops.flash_cuda.fwd
    wrt = [q, k, v] + ([] if packed else [mask])
    loss = lambda out, lse: (out * out).sum() + lse.sum()
    grads = torch.autograd.grad(loss(*api()), wrt)
    assert calls == []  # the eager path
    want = torch.autograd.grad(loss(*op(*args)), wrt)
    assert len(calls) == 1  # the registered formula, through torch.library's wrapper
    assert all(torch.equal(g, w) for g, w in zip(grads, want))
    torch._dynamo.reset()
    graphs = []

    def recording(gm, example_inputs):  # the graph dynamo traced, run as it is
        graphs.append(str(gm.graph))
        return gm.forward

    compiled = torch.autograd.grad(loss(*torch.compile(api, backend=recording, fullgraph=True)()), wrt)
    assert all(torch.allclose(g, w) for g, w in zip(compiled, want))
    name = "varlen_fwd" if packed else "fwd"
    assert len(graphs) == 1 and f"flash_cuda.{name}" in graphs[0] and "autograd_function" not in graphs[0]


def test_calls_without_a_graph_skip_torch_librarys_autograd_layer():
    """Eager calls that need no graph (no gradients; the backward op inside a backward without
    create_graph) go straight below autograd (ops.py, _below_autograd), not through
    torch.library's Python autograd layer, whose no-grad path cost about 5 us a call; the results
    equal, bitwise, those of the op through that layer; with create_graph the backward op keeps
    its registration (test_double_backward_raises)."""
    import sys
    entered = []

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.replace("\\", "/").endswith("torch/_library/autograd.py"):
            entered.append(frame.f_code.co_name)

    q, k, v = (rand(*shape, dtype=torch.float32, seed=i).requires_grad_()
               for i, shape in enumerate([(1, 4, 9, 16), (1, 2, 13, 16), (1, 2, 13, 16)]))
    dout = rand(1, 4, 9, 16, dtype=torch.float32, seed=3)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32), torch.tensor([0, 6, 13], dtype=torch.int32)
    flat = lambda x: x[0].transpose(0, 1)  # (1, H, N, D) -> (N, H, D)
    sys.setprofile(profile)
    try:
        with torch.no_grad():
            out = flash_cuda.attention(q, k, v, causal=True)
            packed = flash_cuda.varlen_attention(flat(q), flat(k), flat(v), *cu, 5, 7, causal=True)
        grads = torch.autograd.grad(flash_cuda.attention(q, k, v, causal=True), (q, k, v), dout)
    finally:
        sys.setprofile(None)
    assert entered == []
    args = (q, k, v, 0.25, True, True)
    with torch.no_grad():
        want, lse = torch.ops.flash_cuda.fwd(*args)
        want_packed = torch.ops.flash_cuda.varlen_fwd(flat(q), flat(k), flat(v), *cu, 5, 7, 0.25, True)[0]
    want_grads = torch.ops.flash_cuda.bwd(dout, *args[:3], want, lse, None, 0.25, True, True)[:3]
    assert torch.equal(out, want) and torch.equal(packed, want_packed)
    assert all(torch.equal(g, w) for g, w in zip(grads, want_grads))
    assert not out.requires_grad and out.grad_fn is None


def test_host_overhead_bench_smoke(tmp_path):
    bench = load_benchmark("host_overhead")
    rows = bench.main(["--calls", "3", "--rounds", "1", "--json", str(tmp_path / "rows.json")])
    assert [r["call"] for r in rows] == ["forward, no gradients", "forward + backward", "KV-cache decoding step"]
    assert all(r["ours_us"] > 0 and r["sdpa_us"] > 0 for r in rows)
    assert (tmp_path / "rows.json").read_text().count("ours_us") == 3


def test_forward_mode_ad_raises():
    """Forward-mode AD has no formula: a tangent on any input (torch.func.jvp, forward_ad's dual
    tensors) raises NotImplementedError naming it, as torch SDPA's fused kernels do; before, the
    kernels dropped it and jvp returned a zero tangent, silently. Reverse mode is unaffected."""
    import torch.autograd.forward_ad as fwAD
    q, k, v = (rand(1, 2, 5, 8, dtype=torch.float64, seed=i) for i in range(3))
    mask = rand(1, 2, 5, 5, dtype=torch.float64, seed=4)
    cu = torch.tensor([0, 5], dtype=torch.int32)
    flat = lambda x: x[0].transpose(0, 1)
    calls = {
        "attention": lambda q, k, v: flash_cuda.attention(q, k, v),
        "sdpa": lambda q, k, v: flash_cuda.scaled_dot_product_attention(q, k, v),
        "varlen": lambda q, k, v: flash_cuda.varlen_attention(flat(q), flat(k), flat(v), cu, cu, 5, 5),
        "kvcache": lambda q, k, v: flash_cuda.attention_with_kvcache(q, k, v),
    }
    for name, f in calls.items():
        for i, arg in enumerate("qkv"):
            if name == "kvcache" and arg != "q":
                arg = f"{arg}_cache"
            primals = [q, k, v]
            with pytest.raises(NotImplementedError, match=f"forward-mode AD .* {arg} has a tangent"):
                torch.func.jvp(lambda x: f(*primals[:i], x, *primals[i + 1:]), (primals[i],),
                               (torch.ones_like(primals[i]),))
    with fwAD.dual_level():  # a tangent on the mask, q requiring grad (the graph path)
        qg = q.clone().requires_grad_()
        with pytest.raises(NotImplementedError, match="attn_mask has a tangent"):
            flash_cuda.attention(qg, k, v, attn_mask=fwAD.make_dual(mask, torch.ones_like(mask)))
        out = flash_cuda.attention(qg, k, v, attn_mask=mask)  # no tangent anywhere: runs
        batched = torch.func.vmap(flash_cuda.attention)(q[:, None], k[:, None], v[:, None])[:, 0]  # (vmap too)
        assert_close_fp("vmap", batched, attention_ref(q, k, v)[0])
        with pytest.raises(NotImplementedError, match="alibi_slopes has a tangent"):
            flash_cuda.attention_with_kvcache(q, k, v, alibi_slopes=fwAD.make_dual(torch.rand(2), torch.ones(2)))
    with pytest.raises(NotImplementedError, match="forward-mode AD .* has a tangent"):  # forward over reverse
        torch.func.hessian(lambda x: flash_cuda.attention(x, k, v).sum())(q)
    # jvp over vmap: the tangent shows in the vmap rule (it was torch's bare AssertionError; audit),
    # and a jvp whose tangents never reach the attention still runs
    with pytest.raises(NotImplementedError, match="forward-mode AD .* has a tangent"):
        torch.func.jvp(torch.func.vmap(lambda x: flash_cuda.attention(x, k, v)), (q[:, None],),
                       (torch.ones_like(q[:, None]),))
    w = torch.tensor(2.0, dtype=torch.float64)
    out_t, tangent = torch.func.jvp(lambda w: w * torch.func.vmap(lambda x: flash_cuda.attention(x, k, v))(q[:, None]),
                                    (w,), (torch.ones_like(w),))
    assert torch.equal(tangent, out_t / 2)
    grad, = torch.autograd.grad(out.sum(), qg)
    ref, = torch.autograd.grad(attention_ref(qg, k, v, attn_mask=mask)[0].sum(), qg)
    assert_close_fp("dq", grad, ref)


def test_torch_func_transforms():
    """torch.func's reverse-mode transforms (grad, vjp, jacrev, vmap of grad) through attention
    (a float mask and ALiBi slopes among the differentiated inputs) and varlen_attention, against
    the float64 reference: before, each raised (flash_cuda's Function and torch.library's had no
    separate setup_context, which those transforms require). Gradients of gradients still raise."""
    q, k, v = (rand(2, 2, 5, 8, seed=i) for i in range(3))
    mask = rand(2, 2, 5, 5, seed=3)
    slopes = torch.rand(2, generator=torch.Generator().manual_seed(4), dtype=torch.float64).float()
    f = lambda q, k, v, m: flash_cuda.attention(q, k, v, causal=True, alibi_slopes=slopes, attn_mask=m)
    ref = lambda q, k, v, m: attention_ref(q, k, v, causal=True, alibi_slopes=slopes, attn_mask=m)[0]
    loss = lambda fn: lambda *x: (fn(*x) ** 2).sum()
    for got, want in zip(torch.func.grad(loss(f), argnums=(0, 1, 2, 3))(q, k, v, mask),
                         torch.func.grad(loss(ref), argnums=(0, 1, 2, 3))(q, k, v, mask)):
        assert_close_fp("grad", got, want)
    dout = rand(2, 2, 5, 8, seed=5)
    for got, want in zip(torch.func.vjp(f, q, k, v, mask)[1](dout), torch.func.vjp(ref, q, k, v, mask)[1](dout)):
        assert_close_fp("vjp", got, want)
    assert_close_fp("jacrev", torch.func.jacrev(f)(q[:1], k[:1], v[:1], mask[:1]),
                    torch.func.jacrev(ref)(q[:1], k[:1], v[:1], mask[:1]))
    per_batch = torch.func.vmap(torch.func.grad(loss(f)))(q[:, None], k[:, None], v[:, None], mask[:, None])
    assert_close_fp("vmap(grad)", per_batch[:, 0], torch.func.grad(loss(ref))(q, k, v, mask))
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    flat = lambda x: x[0].transpose(0, 1)  # (1, H, N, D) -> (N, H, D)
    packed = lambda q: flash_cuda.varlen_attention(q, flat(k), flat(v), cu, cu, 3, 3)
    got = torch.func.grad(lambda x: (packed(x) ** 2).sum())(flat(q))
    want = [torch.func.grad(lambda x: (attention_ref(x, k[:1, :, a:b], v[:1, :, a:b])[0] ** 2).sum())(q[:1, :, a:b])
            for a, b in ((0, 2), (2, 5))]
    assert_close_fp("varlen grad", got, flat(torch.cat(want, dim=2)))
    with pytest.raises(RuntimeError, match="double backward"):
        torch.func.grad(lambda x: torch.func.grad(loss(f))(x, k, v, mask).sum())(q)
    # vmap and functionalize inside an ordinary autograd graph: their wrapped tensors hide that q
    # requires grad, and the gradient through them must not be lost (a review found it was)
    qg = q.clone().requires_grad_()
    batched = lambda fn: torch.func.vmap(fn)(qg[:, None], k[:, None], v[:, None], mask[:, None])[:, 0]
    for name, out in (("vmap", batched(f)), ("functionalize", torch.func.functionalize(f)(qg, k, v, mask))):
        got, = torch.autograd.grad(loss(lambda *x: x[0])(out), qg)
        want, = torch.autograd.grad(loss(ref)(qg, k, v, mask), qg)
        assert_close_fp(f"{name} under autograd", got, want)
    with torch.no_grad():
        assert not batched(f).requires_grad


def op_args(device, dtype, requires_grad):
    q = rand(2, 4, 33, 16, dtype=dtype, device=device, seed=1).requires_grad_(requires_grad)
    k = rand(2, 2, 40, 16, dtype=dtype, device=device, seed=2).requires_grad_(requires_grad)
    v = rand(2, 2, 40, 16, dtype=dtype, device=device, seed=3).requires_grad_(requires_grad)
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_opcheck_fwd(device, dtype, causal):
    skip_unless_supported(device, dtype)
    for requires_grad in (False, True):
        args = (*op_args(device, dtype, requires_grad), 0.25, causal, True)
        torch.library.opcheck(torch.ops.flash_cuda.fwd.default, args)


@pytest.mark.parametrize("with_dlse", [False, True])
def test_opcheck_bwd(device, with_dlse):
    q, k, v = op_args(device, widest_dtype(device), False)
    out, lse = torch.ops.flash_cuda.fwd(q, k, v, 0.25, True, True)
    dout = torch.randn_like(out)
    dlse = torch.randn_like(lse) if with_dlse else None
    torch.library.opcheck(torch.ops.flash_cuda.bwd.default, (dout, q, k, v, out, lse, dlse, 0.25, True, True))


def test_torch_compile_fullgraph(device):
    def loss_fn(q, k, v):
        out, lse = flash_cuda.attention(q, k, v, causal=True, return_lse=True)
        return (out * out).sum() + lse.sum()

    compiled = torch.compile(loss_fn, fullgraph=True)
    results = []
    for fn in (loss_fn, compiled):
        leaves = [x.detach().requires_grad_() for x in op_args(device, widest_dtype(device), False)]
        loss = fn(*leaves)
        loss.backward()
        results.append((loss.detach(), [x.grad for x in leaves]))
    (eager_loss, eager_grads), (comp_loss, comp_grads) = results
    if device == "cuda":  # bf16: inductor may fuse (out * out).sum() at another precision
        torch.testing.assert_close(comp_loss, eager_loss)
        for e, c in zip(eager_grads, comp_grads):
            torch.testing.assert_close(c, e)
        return
    assert_close_fp("loss", comp_loss, eager_loss)
    for e, c in zip(eager_grads, comp_grads):
        assert_close_fp("grad", c, e)


def test_double_backward_raises():
    """Gradients of gradients: the backward ops had no autograd kernel, so autograd's fallback took
    them for constants and a second derivative came out as silent zeros (torch's math attention:
    nonzero). Now a RuntimeError when a second backward goes through them, dense and packed; a
    first backward with create_graph=True alone still works."""
    q, k, v = (torch.randn(1, 2, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(i),
                           requires_grad=True) for i in range(3))
    g, = torch.autograd.grad((flash_cuda.attention(q, k, v) ** 2).sum(), q, create_graph=True)
    ref, = torch.autograd.grad((attention_ref(q, k, v)[0] ** 2).sum(), q)
    assert_close_fp("dq", g, ref)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(g.pow(2).sum(), (q, k, v))
    cu = torch.tensor([0, 4], dtype=torch.int32)
    packed = [x[0].transpose(0, 1) for x in (q, k, v)]
    g, = torch.autograd.grad((flash_cuda.varlen_attention(*packed, cu, cu, 4, 4) ** 2).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(g.pow(2).sum(), (q, k, v))


@pytest.mark.parametrize("B,Hq,Hkv", [(1, 1, 1), (2, 6, 2), (1, 8, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_deterministic(device, B, Hq, Hkv, dtype):
    """deterministic=True: bitwise identical outputs and gradients run to run (B*Hkv = 1 exercises the dQ
    partials of several key splits, summed in a fixed order)."""
    skip_unless_supported(device, dtype)
    runs = []
    for _ in range(3):
        q = rand(B, Hq, 300, 64, dtype=dtype, device=device, seed=1).requires_grad_()
        k = rand(B, Hkv, 700, 64, dtype=dtype, device=device, seed=2).requires_grad_()
        v = rand(B, Hkv, 700, 64, dtype=dtype, device=device, seed=3).requires_grad_()
        out, lse = flash_cuda.attention(q, k, v, causal=True, return_lse=True, deterministic=True)
        out.backward(rand(*out.shape, dtype=dtype, device=device, seed=4))
        runs.append([out, lse, q.grad, k.grad, v.grad])
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


@pytest.fixture
def deterministic_algorithms():
    before, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before, warn_only=warn_only)


@pytest.mark.parametrize("entry", ["attention", "varlen", "sdpa_dropin", "flash_attn_func"])
def test_deterministic_algorithms_take_the_deterministic_dq(deterministic_algorithms, entry):
    """torch.use_deterministic_algorithms(True) makes every entry point's CUDA backward take the
    deterministic dQ pass (flash_bwd_dq, no atomic adds), as torch's flash backward does under
    it; the SDPA drop-in, with no argument to ask for it, kept the atomic path (audit by a
    helper). Seen in the emulated kernels' launches."""
    from flash_cuda.flash_attn_interface import flash_attn_func
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, n, 32, generator=g).bfloat16() for n in (16, 384, 384))
    cu_q, cu_k = (torch.tensor([0, n], dtype=torch.int32) for n in (16, 384))
    calls = {"attention": lambda q: flash_cuda.attention(q, k, v),
             "varlen": lambda q: flash_cuda.varlen_attention(q[0].transpose(0, 1), k[0].transpose(0, 1),
                                                             v[0].transpose(0, 1), cu_q, cu_k, 16, 384),
             "sdpa_dropin": lambda q: flash_cuda.scaled_dot_product_attention(q, k, v),
             "flash_attn_func": lambda q: flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))}
    x = q.clone().requires_grad_()
    with flash_cuda.emulate(check=False) as emu:
        calls[entry](x).float().sum().backward()
    kernels = [launch["kernel"] for launch in emu.launches[1:]]
    assert any("bwd_dq" in name for name in kernels), kernels
    assert not any("postprocess" in name for name in kernels), kernels


def test_vmap_folds_into_the_batch():
    """torch.func.vmap runs one call with the vmapped dim folded into the batch (ops.py's vmap
    rules for fwd and bwd): per-slice ALiBi slopes and masks, shared GQA keys, and vmap of grad
    equal a loop over the slices, and torch's per-slice fallback (with its warning asking for a
    batching rule) is not taken."""
    import warnings
    g = torch.Generator().manual_seed(0)
    V, B, Hq, Hkv, N, D = 3, 2, 4, 2, 7, 16
    q = torch.randn(V, B, Hq, N, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, Hkv, N + 2, D, generator=g, dtype=torch.float64) for _ in range(2))
    slopes = torch.rand(V, Hq, generator=g)
    mask = torch.randn(V, 1, Hq, N, N + 2, generator=g, dtype=torch.float64)
    f = lambda q, s, m: flash_cuda.attention(q, k, v, causal=True, alibi_slopes=s, attn_mask=m)
    loss = lambda q, s, m: f(q, s, m).pow(2).sum()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        out = torch.func.vmap(f)(q, slopes, mask)
        grads = torch.func.vmap(torch.func.grad(loss, argnums=(0, 2)))(q, slopes, mask)
    assert torch.equal(out, torch.stack([f(q[i], slopes[i], mask[i]) for i in range(V)]))
    for i in range(V):
        for a, b in zip(grads, torch.func.grad(loss, argnums=(0, 2))(q[i], slopes[i], mask[i])):
            assert torch.allclose(a[i], b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("fn", ["attention", "scaled_dot_product_attention"])
def test_transforms_outside_a_vmap(fn):
    """grad, vjp and jacrev of a function that vmaps attention (an ensemble by vmap, then its
    gradient), vmap of vmap, and with dropout (a mask per slice): before, the vmap rule called the
    op, whose autograd wrapper torch.func refuses ("must override the setup_context
    staticmethod": an audit). Against the float64 reference; with dropout, against the reference
    on the masks the same call returns."""
    g = torch.Generator().manual_seed(5)
    V = 3
    q, k, v = (torch.randn(V, 2, 2, 5, 8, generator=g, dtype=torch.float64) for _ in range(3))
    f = getattr(flash_cuda, fn)
    ref = lambda q, k, v: attention_ref(q, k, v)[0]  # noqa: E731
    loss = lambda attn: lambda q, k, v: torch.func.vmap(attn)(q, k, v).pow(2).sum()  # noqa: E731
    for got, want in zip(torch.func.grad(loss(f), argnums=(0, 1, 2))(q, k, v),
                         torch.func.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)):
        assert_close_fp("grad(vmap)", got, want)
    dout = torch.randn(V, 2, 2, 5, 8, generator=g, dtype=torch.float64)
    for got, want in zip(torch.func.vjp(torch.func.vmap(f), q, k, v)[1](dout),
                         torch.func.vjp(torch.func.vmap(ref), q, k, v)[1](dout)):
        assert_close_fp("vjp(vmap)", got, want)
    one = lambda attn: lambda x: torch.func.vmap(attn)(x, k[:, :1], v[:, :1])  # noqa: E731
    assert_close_fp("jacrev(vmap)", torch.func.jacrev(one(f))(q[:, :1]), torch.func.jacrev(one(ref))(q[:, :1]))
    twice = lambda attn: lambda q: torch.func.vmap(torch.func.vmap(attn))(  # noqa: E731
        q, k.expand(2, *k.shape), v.expand(2, *v.shape)).pow(2).sum()
    assert_close_fp("grad(vmap(vmap))", torch.func.grad(twice(f))(q.expand(2, *q.shape).clone()),
                    torch.func.grad(twice(ref))(q.expand(2, *q.shape).clone()))
    if fn == "attention":  # a mask per slice: the reference on the masks the call returns
        p = 0.3

        def dropped(q, k, v):
            out, mask = f(q, k, v, dropout_p=p, return_dropout_mask=True)
            return out, mask

        def ref_dropped(q, k, v, mask):
            return attention_ref(q, k, v, dropout_mask=mask, dropout_p=p)[0]

        torch.manual_seed(11)
        out, pullback, mask = torch.func.vjp(torch.func.vmap(dropped, randomness="different"), q, k, v, has_aux=True)
        assert not all(torch.equal(mask[0], mask[i]) for i in range(1, V))
        slices = lambda q, k, v: torch.func.vmap(ref_dropped)(q, k, v, mask)  # noqa: E731
        assert_close_fp("vmap dropout out", out, slices(q, k, v))
        got = pullback(dout)
        want = torch.func.vjp(slices, q, k, v)[1](dout)
        for a, b in zip(got, want):
            assert_close_fp("vjp(vmap dropout)", a, b)


def test_vmap_where_no_function_may_run():
    """vmap reaching the raw op (a direct call, functionalize inside vmap, a compiled vmap), where
    the op's own rule runs and no autograd.Function may: a version of the transforms fix above
    called the eager wrapper from that rule too and raised there (a review). Each equals the loop
    over the slices; a backward through vmap of the op reaches q."""
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 1, 2, 5, 8, generator=g, dtype=torch.float64) for _ in range(3))
    loop = lambda fn: torch.stack([fn(q[i], k[i], v[i]) for i in range(2)])  # noqa: E731
    op = lambda q, k, v: torch.ops.flash_cuda.fwd(q, k, v, 0.25, False, True)[0]  # noqa: E731
    assert torch.equal(torch.func.vmap(op)(q, k, v), loop(op))
    want = loop(flash_cuda.attention)
    assert torch.equal(torch.func.vmap(torch.func.functionalize(flash_cuda.attention))(q, k, v), want)
    compiled = torch.compile(torch.func.vmap(flash_cuda.attention), backend="eager", fullgraph=True)
    assert torch.equal(compiled(q, k, v), want)
    qg = q.clone().requires_grad_()
    got, = torch.autograd.grad(torch.func.vmap(op)(qg, k, v).pow(2).sum(), qg)
    ref = lambda x: attention_ref(x, k[0], v[0], scale=0.25)[0].pow(2).sum()  # noqa: E731
    assert_close_fp("vmap(op) backward", got[0], torch.func.grad(ref)(q[0]))


@pytest.mark.parametrize("fn", ["attention", "scaled_dot_product_attention"])
def test_vmap_over_a_batched_bool_mask(fn):
    """A bool attn_mask batched by vmap (one mask per slice) against unbatched or batched q, k, v:
    the mask's additive bias was filled in place into an unbatched tensor, which vmap refused
    (audit). Equal to a loop over the slices, forward and vmap of grad."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 2, 2, 5, 8, generator=g, dtype=torch.float64)
    mask = torch.rand(3, 5, 5, generator=g) > 0.4
    mask[..., 0] = True
    f = lambda a, m: getattr(flash_cuda, fn)(a, a, a, attn_mask=m)  # noqa: E731
    out = torch.func.vmap(f)(x, mask)
    assert torch.equal(out, torch.stack([f(x[i], mask[i]) for i in range(3)]))
    ref = torch.stack([attention_ref(x[i], x[i], x[i], attn_mask=mask[i])[0] for i in range(3)])
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    loss = lambda a, m: f(a, m).pow(2).sum()  # noqa: E731
    grads = torch.func.vmap(torch.func.grad(loss))(x, mask)
    for i in range(3):
        torch.testing.assert_close(grads[i], torch.func.grad(loss)(x[i], mask[i]), rtol=0, atol=1e-12)
    out = torch.func.vmap(f, in_dims=(None, 0))(x[0], mask)  # one input, a mask per slice
    assert torch.equal(out, torch.stack([f(x[0], mask[i]) for i in range(3)]))


def test_vmap_over_an_empty_dim():
    """vmap over a dimension of size 0 gives the empty batched output (it raised an IndexError in
    the vmap rule; review)."""
    q, k, v = (torch.randn(0, 2, 4, 5, 8), torch.randn(2, 4, 5, 8), torch.randn(2, 4, 5, 8))
    out = torch.func.vmap(flash_cuda.attention, in_dims=(0, None, None))(q, k, v)
    assert out.shape == (0, 2, 4, 5, 8)
    out = torch.func.vmap(flash_cuda.scaled_dot_product_attention, in_dims=(0, None, None))(q, k, v)
    assert out.shape == (0, 2, 4, 5, 8)
