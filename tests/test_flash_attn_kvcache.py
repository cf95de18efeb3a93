"""FlashAttention-2's inference arguments that flash_cuda's own API lacks. flash_attn_with_kvcache's
rotary embedding (rotary_cos, rotary_sin, rotary_interleaved), cache_batch_idx and cache_leftpad: a
seeded randomised differential test (dtypes, shapes, GQA, cache layouts the caller slices or packs,
masks and score modifiers, split counts) against a float64 reference written independently (the
rotation as a complex product, attention per sequence over the keys from the left pad), the cache
checked row by row after the append, the same through the CUDA kernels in the emulator, a
generation loop, compile, layouts and every rejected argument. flash_attn_varlen_func's
block_table: outputs and gradients (into the pools) against the reference reading each key from
its page, emulated, and every rejected argument."""
import random

import pytest
import torch

import flash_cuda
from flash_cuda import flash_attn_interface as fa
from reference import assert_close_fp, assert_fa_rule, attention_ref


def rotary_ref(x, cos, sin, positions, interleaved):
    """float64: feature pairs (a, b) of x (B, N, H, D), (2i, 2i + 1) interleaved, else (i, i + half),
    as complex numbers times exp(i theta) at rows `positions` (B, N) of cos and sin."""
    x, half = x.double(), cos.shape[1]
    head = x[..., :2 * half]
    z = torch.complex(head[..., 0::2], head[..., 1::2]) if interleaved else torch.complex(head[..., :half],
                                                                                         head[..., half:])
    z = z * torch.complex(cos.double()[positions], sin.double()[positions])[:, :, None]
    turned = torch.stack((z.real, z.imag), -1).flatten(-2) if interleaved else torch.cat((z.real, z.imag), -1)
    return torch.cat((turned, x[..., 2 * half:]), -1)


def fa2_window(window, seqlen_k):
    """The window FlashAttention-2's kernels get (flash_api.cpp: mha_fwd, mha_varlen_fwd and
    mha_fwd_kvcache set a bound >= seqlen_k to -1, then set_params_fprop bounds a window open on
    the right at seqlen_k when its left is bounded), for the reference's mask formula."""
    left, right = (-1 if w < 0 or w >= seqlen_k else w for w in window)
    return (left, seqlen_k if left >= 0 and right < 0 else right)


def caches(layout, Bc, cap, hkv, D, dtype, g):
    """k_cache, v_cache (Bc, cap, hkv, D) in FlashAttention's layout: separate tensors, slices of a
    longer buffer along seqlen, or the halves of a packed (Bc, cap, 2, hkv, D) one."""
    if layout == "plain":
        return tuple(torch.randn(Bc, cap, hkv, D, generator=g).to(dtype) for _ in range(2))
    if layout == "sliced":
        return tuple(torch.randn(Bc, cap + 5, hkv, D, generator=g).to(dtype)[:, 2:cap + 2] for _ in range(2))
    kv = torch.randn(Bc, cap, 2, hkv, D, generator=g).to(dtype)
    return kv[:, :, 0], kv[:, :, 1]


def draw(seed, dtypes):
    rnd, g = random.Random(seed), torch.Generator().manual_seed(seed)
    dtype = rnd.choice(dtypes)
    B, hkv, group = rnd.randint(1, 4), rnd.randint(1, 3), rnd.choice([1, 2, 3])
    D = rnd.choice([16, 32, 40, 64])
    rotary_dim = rnd.choice([0, D, D // 2, 2 * rnd.randint(1, D // 2)])
    n_new = rnd.randint(1 if rotary_dim else 0, 4)
    nq = rnd.choice([1, 1, 2, 5])
    cap = rnd.randint(max(n_new, 1), 80)
    indexed = rnd.random() < 0.6
    Bc = B + (rnd.randint(0, 3) if indexed else 0)
    seqlens = [rnd.choice([0, cap - n_new, rnd.randint(0, cap - n_new)]) for _ in range(B)]
    leftpad = [rnd.choice([0, s, rnd.randint(0, s)]) for s in seqlens] if rnd.random() < 0.6 else None
    kw = {}
    if rnd.random() < 0.4:
        kw["causal"] = True
    elif rnd.random() < 0.3:
        kw["window_size"] = (rnd.choice([rnd.randint(0, 12), 100, -1]), rnd.choice([-1, 0, 3, 100]))
    if rnd.random() < 0.3:
        kw["softcap"] = rnd.choice([2.0, 15.0])
    if rnd.random() < 0.3:
        kw["alibi_slopes"] = torch.rand(hkv * group, generator=g) * 0.3
    kw["num_splits"] = rnd.choice([0, 1, 3])
    case = dict(dtype=dtype, B=B, Bc=Bc, hkv=hkv, hq=hkv * group, D=D, nq=nq, n_new=n_new, cap=cap,
                layout=rnd.choice(["plain", "sliced", "packed"]), interleaved=rnd.random() < 0.5,
                batch_idx=torch.randperm(Bc, generator=g)[:B].to(torch.int32) if indexed else None,
                seqlens=torch.tensor(seqlens, dtype=torch.int32),
                leftpad=None if leftpad is None else torch.tensor(leftpad, dtype=torch.int32))
    kc, vc = caches(case["layout"], Bc, cap, hkv, D, dtype, g)
    q = torch.randn(B, nq, hkv * group, D, generator=g).to(dtype)
    k, v = (torch.randn(B, n_new, hkv, D, generator=g).to(dtype) if n_new else None for _ in range(2))
    rot = None
    if rotary_dim:
        # (FlashAttention-2's seqlen_ro >= seqlen_cache; causal and local queries may reach nq - 1 past it)
        angle = torch.rand(cap + nq + rnd.randint(-1, 2), rotary_dim // 2, generator=g, dtype=torch.float64) * 6.3
        rot = (angle.cos().to(dtype), angle.sin().to(dtype))
    return case, kw, kc, vc, q, k, v, rot


def check_case(seed, dtypes=(torch.float32, torch.float64, torch.float16, torch.bfloat16), emulated=False,
               device="cpu"):
    """One draw through the drop-in (on `device`: tensors made on the CPU, moved there, the
    caches brought back after the call) against the reference."""
    c, kw, kc, vc, q, k, v, rot = draw(seed, dtypes)
    B, dtype, seqlens, n_new = c["B"], c["dtype"], c["seqlens"].tolist(), c["n_new"]
    before_k, before_v = kc.clone(), vc.clone()
    call = dict(kw, cache_seqlens=c["seqlens"], cache_batch_idx=c["batch_idx"], cache_leftpad=c["leftpad"],
                rotary_interleaved=c["interleaved"], return_softmax_lse=True)
    if rot is not None:
        call.update(rotary_cos=rot[0], rotary_sin=rot[1])
    on = lambda x: x.to(device) if isinstance(x, torch.Tensor) else x  # noqa: E731
    dkc, dvc = on(kc), on(vc)
    with flash_cuda.emulate() if emulated else torch.no_grad():
        out, lse = fa.flash_attn_with_kvcache(on(q), dkc, dvc, on(k), on(v), **{n: on(x) for n, x in call.items()})
    out, lse, kc, vc = out.cpu(), lse.cpu(), dkc.cpu(), dvc.cpu()
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (B, c["hq"], c["nq"])

    # the positions FlashAttention-2 turns q and the new keys by
    local = kw.get("causal", False) or any(0 <= w < c["cap"] for w in kw.get("window_size", ()))
    at = lambda n: c["seqlens"].long()[:, None] + torch.arange(n)  # noqa: E731
    q_pos = at(c["nq"]) if local else at(1).expand(B, c["nq"])
    turn = (lambda x, pos: x.double()) if rot is None else (lambda x, pos: rotary_ref(x, *rot, pos, c["interleaved"]))
    q_ref = turn(q, q_pos)
    k_ref = None if k is None else turn(k, at(n_new))

    # the cache: new keys (turned) at rows seqlens[b].. of batch batch_idx[b], every other row as before
    index = c["batch_idx"].tolist() if c["batch_idx"] is not None else list(range(B))
    want_k, want_v = before_k.clone(), before_v.clone()
    for b, i in enumerate(index):
        s = seqlens[b]
        if n_new:
            new_rows = kc[i, s:s + n_new].double()
            wide = torch.finfo(torch.promote_types(dtype, torch.float32)).eps  # (the rotation's precision)
            bound = torch.finfo(dtype).eps * k_ref[b].abs() + 4 * wide * k[b].double().abs().max()
            assert ((new_rows - k_ref[b]).abs() <= bound).all(), f"seed {seed}: appended keys of sequence {b}"
            want_k[i, s:s + n_new] = kc[i, s:s + n_new]
            want_v[i, s:s + n_new] = v[b]
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v), f"seed {seed}: the append wrote elsewhere"

    # attention per sequence over its keys from the left pad, the mask and ALiBi counting from there
    window = fa2_window(kw.get("window_size", (-1, -1)), c["cap"])
    ref_kw = dict(causal=kw.get("causal", False), softcap=kw.get("softcap", 0.0), window=window)
    slopes = kw.get("alibi_slopes")
    outs = {}
    # ref: exact; plain: plain torch in the dtype on the turned values rounded to it (as ours sees
    # them); rounded: exact on those rounded values
    for name, rdtype, rounded in (("ref", torch.float64, False), ("plain", dtype, True),
                                  ("rounded", torch.float64, True)):
        per = []
        for b, i in enumerate(index):
            lp = 0 if c["leftpad"] is None else c["leftpad"][b].item()
            keys, vals = before_k[i, lp:seqlens[b]].double(), before_v[i, lp:seqlens[b]].double()
            if n_new:
                keys, vals = torch.cat([keys, k_ref[b]]), torch.cat([vals, v[b].double()])
            qb = q_ref[b:b + 1]
            if rounded:
                qb, keys, vals = qb.to(dtype), keys.to(dtype), vals.to(dtype)
            o, lse_b = attention_ref(qb.transpose(1, 2), keys.transpose(0, 1)[None], vals.transpose(0, 1)[None],
                                     dtype=rdtype, alibi_slopes=slopes, **ref_kw)
            per.append((o.transpose(1, 2), lse_b))
        outs[name] = (torch.cat([o for o, _ in per]), torch.cat([lse_b for _, lse_b in per]))
    ref_o, ref_l = outs["ref"]
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_l)), f"seed {seed}: rows without keys"
    zero = lambda x: x.masked_fill(torch.isinf(ref_l), 0)  # noqa: E731
    if dtype in (torch.float32, torch.float64):
        rtol = 2e-5 if dtype == torch.float32 else 1e-12
        assert_close_fp(f"seed {seed}: out", out, ref_o, rtol)
        assert_close_fp(f"seed {seed}: lse", zero(lse), zero(ref_l), rtol)
    else:
        assert_fa_rule(f"seed {seed}: out", out, outs["plain"][0], ref_o, 2)
        # lse is computed in fp32 from the rounded turned values: exact on those up to fp32's
        # rounding (against the exact lse it carries the turned values' rounding, which plain
        # torch's lse, its scores rounded to the dtype too, may cancel by luck: 1 seed in 500)
        assert_close_fp(f"seed {seed}: lse", zero(lse), zero(outs["rounded"][1]), 2e-5)
    return c


@pytest.mark.parametrize("seed", range(100))
def test_randomised_against_the_reference(seed):
    check_case(seed)


# Draws beyond the seeds above where the output exceeds FlashAttention's rule (2x plain torch's
# error + 1e-5), found by soaks of this test on 2026-12-06 (CPU seeds 100-6099, emulated 1100-5499):
# one query row of few keys, where the FlashAttention algorithm's own rounding of P to the dtype
# before P V costs more than plain torch's roundings happen to on that row.
_KNOWN_EXCESS = {
    3698: ("CPU backend", "fp16, sequence 0 one query against the 3 keys it appends, D 64, rotary: 1.38e-3 "
                          "from float64 where plain fp16 torch is 5.9e-4 off; 8.4e-4 from exact attention on "
                          "the rounded turned values, as the FlashAttention algorithm in float64 with P = "
                          "exp(s - max) rounded to fp16 before P V (8.4e-4; it and ours 1 fp16 ulp apart)"),
    4919: ("emulated CUDA kernels", "fp16, one query against 13 keys (window (12, -1) bounded on the right "
                                    "at the capacity 16), D 16, rotary: 4.0e-4 from float64 where plain fp16 "
                                    "torch is 1.3e-4 off; bit for bit the FlashAttention algorithm in float64 "
                                    "with P rounded to fp16 before P V (2.6e-4 from exact attention on the "
                                    "rounded turned values)"),
    6489: ("emulated CUDA kernels", "bf16, one query against the 4 keys it appends to an empty cache (batches as "
                                    "pages), D 16, rotary, 3 splits asked: 1.03e-2 from float64 where plain bf16 "
                                    "torch is 4.8e-3 off; every head's row bit for bit the FlashAttention "
                                    "algorithm in float64 on the rounded turned values with P = exp(s - max) "
                                    "rounded to bf16 before P V (its sum unrounded); found by a soak on "
                                    "2026-12-07 (emulated seeds 5500-6499)"),
}


@pytest.mark.parametrize("seed", [pytest.param(s, marks=pytest.mark.xfail(
    strict=True, reason=f"known: the FA rule's max over one row of 16 to 128 outputs. Seed {s}, {where}: {why}"))
    for s, (where, why) in _KNOWN_EXCESS.items()])
def test_randomised_known_excess(seed):
    if _KNOWN_EXCESS[seed][0] == "CPU backend":
        check_case(seed)
    else:
        check_case(seed, dtypes=(torch.float16, torch.bfloat16), emulated=True)


def test_the_draws_cover_every_feature():
    """The seeds above draw each feature and its absence (a guard against a draw that never
    exercises one)."""
    cases = [draw(s, (torch.float32, torch.float64, torch.float16, torch.bfloat16)) for s in range(100)]
    assert {c["layout"] for c, *_ in cases} == {"plain", "sliced", "packed"}
    for has in (lambda c, kw, rot: rot is not None, lambda c, kw, rot: c["leftpad"] is not None,
                lambda c, kw, rot: c["batch_idx"] is not None, lambda c, kw, rot: c["interleaved"],
                lambda c, kw, rot: kw.get("causal", False), lambda c, kw, rot: "window_size" in kw,
                lambda c, kw, rot: c["leftpad"] is not None and c["leftpad"].max() > 0,
                lambda c, kw, rot: c["n_new"] > 1, lambda c, kw, rot: c["nq"] > 1 and rot is not None,
                lambda c, kw, rot: max(kw.get("window_size", (-1, -1))) >= c["cap"] and rot is not None,
                lambda c, kw, rot: c["dtype"] == torch.float64 and rot is not None):
        hits = [has(c, kw, rot) for c, kw, *_, rot in cases]
        assert any(hits) and not all(hits)


@pytest.mark.parametrize("seed", range(10))
def test_emulated_kernels_against_the_reference(seed):
    """The same through the CUDA kernels in the emulator (fp16/bf16): a cache indexed by batch runs
    the paged kernels with one page per batch; a left pad is the kernels' row offset."""
    check_case(1000 + seed, dtypes=(torch.float16, torch.bfloat16), emulated=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("seed", range(12))
def test_cuda_kernels_against_the_reference(seed):
    """The same on a GPU (fp16/bf16): the CUDA kernels, the rotation and the tables on the device
    (caches moved there contiguous; CUDA values are not checked, so only valid draws)."""
    check_case(2000 + seed, dtypes=(torch.float16, torch.bfloat16), device="cuda")


def test_rotary_on_a_decode_step_as_documented():
    """One decode step, structured: cos = 1, sin = 0 at every position but the current one
    (position cache_seqlens[b]), where the angle is a quarter turn: non-interleaved (GPT-NeoX) the
    first half of the rotary features becomes minus the second half and the second the first;
    features past rotary_dim are kept; the appended key is turned the same way."""
    B, cap, H, D, rd = 2, 8, 2, 16, 8
    g = torch.Generator().manual_seed(4)
    cos, sin = torch.ones(cap, rd // 2), torch.zeros(cap, rd // 2)
    seqlens = torch.tensor([3, 5], dtype=torch.int32)
    kc, vc = torch.zeros(B, cap, H, D), torch.zeros(B, cap, H, D)
    q, k, v = (torch.randn(B, 1, H, D, generator=g) for _ in range(3))
    for b in range(B):
        cos[seqlens[b]], sin[seqlens[b]] = 0.0, 1.0
    fa.flash_attn_with_kvcache(q, kc, vc, k, v, rotary_cos=cos, rotary_sin=sin, cache_seqlens=seqlens,
                               rotary_interleaved=False)
    for b in range(B):
        row = kc[b, seqlens[b]]
        assert torch.equal(row[:, :rd // 2], -k[b, 0, :, rd // 2:rd]) and torch.equal(row[:, rd // 2:rd], k[b, 0, :, :rd // 2])
        assert torch.equal(row[:, rd:], k[b, 0, :, rd:])


@pytest.mark.parametrize("where", ["cpu", "emulated"])
def test_generation_loop_with_rotary_leftpad_and_batch_index(where):
    """A left-padded batch generating 6 tokens: the prompts (turned by the reference) written into
    caches of a larger pool at rows from the pad on, then decode steps with the rotary tables,
    cache_leftpad and cache_batch_idx; each step's output against causal attention over every
    token so far (turned at its position), in float64."""
    dtype = torch.float32 if where == "cpu" else torch.float16
    g = torch.Generator().manual_seed(12)
    B, Bc, cap, hq, hkv, D, prompt, steps = 2, 4, 24, 4, 2, 32, 5, 6
    angle = torch.rand(cap, D // 2, generator=g, dtype=torch.float64) * 6.3
    cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
    idx, pad = torch.tensor([3, 1], dtype=torch.int32), torch.tensor([2, 0], dtype=torch.int32)
    kc, vc = (torch.randn(Bc, cap, hkv, D, generator=g).to(dtype) for _ in range(2))
    keys, vals = [], []
    for b in range(B):  # the prompt after the pad, turned at positions pad .. pad + prompt - 1 (cache rows)
        pos = torch.arange(pad[b], pad[b] + prompt)[None]
        kb = rotary_ref(torch.randn(1, prompt, hkv, D, generator=g).to(dtype), cos, sin, pos, True)
        vb = torch.randn(1, prompt, hkv, D, generator=g).to(dtype).double()
        kc[idx[b], pad[b]:pad[b] + prompt], vc[idx[b], pad[b]:pad[b] + prompt] = kb[0].to(dtype), vb[0].to(dtype)
        keys.append([kb[0].to(dtype).double()])
        vals.append([vb[0]])
    seqlens = pad + prompt
    for step in range(steps):
        q = torch.randn(B, 1, hq, D, generator=g).to(dtype)
        k, v = (torch.randn(B, 1, hkv, D, generator=g).to(dtype) for _ in range(2))
        with flash_cuda.emulate() if where == "emulated" else torch.no_grad():
            out = fa.flash_attn_with_kvcache(q, kc, vc, k, v, rotary_cos=cos, rotary_sin=sin, cache_seqlens=seqlens,
                                             cache_batch_idx=idx, cache_leftpad=pad, causal=True)
        for b in range(B):
            pos = seqlens[b:b + 1].long()[:, None]
            keys[b].append(rotary_ref(k[b:b + 1], cos, sin, pos, True)[0])
            vals[b].append(v[b].double())
            kk, vv = torch.cat(keys[b]), torch.cat(vals[b])
            ref, _ = attention_ref(rotary_ref(q[b:b + 1], cos, sin, pos, True).transpose(1, 2),
                                   kk.transpose(0, 1)[None], vv.transpose(0, 1)[None], causal=True)
            err = (out[b].double() - ref[0].transpose(0, 1)).abs().max().item()
            assert err < (2e-5 if dtype == torch.float32 else 4e-3), f"step {step}, sequence {b}: {err:.3g}"
        seqlens = seqlens + 1


def test_a_cache_shared_by_sequences_that_only_read_it():
    """cache_batch_idx may repeat an index when nothing is appended (sequences reading one prompt's
    cache): each equals the call on its own cache."""
    g = torch.Generator().manual_seed(2)
    kc, vc = (torch.randn(2, 16, 2, 32, generator=g) for _ in range(2))
    q = torch.randn(3, 2, 4, 32, generator=g)
    idx, lens = torch.tensor([1, 1, 0], dtype=torch.int32), torch.tensor([9, 12, 16], dtype=torch.int32)
    pad = torch.tensor([0, 3, 1], dtype=torch.int32)
    out = fa.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, cache_batch_idx=idx, cache_leftpad=pad,
                                     causal=True)
    for b in range(3):
        i, p, n = idx[b].item(), pad[b].item(), lens[b].item()
        want = fa.flash_attn_with_kvcache(q[b:b + 1], kc[i:i + 1, p:n].contiguous(), vc[i:i + 1, p:n].contiguous(),
                                          causal=True)
        torch.testing.assert_close(out[b:b + 1], want, rtol=1e-6, atol=1e-6)


def test_under_torch_compile():
    """The drop-in with all three arguments compiles (the table and the rotation are traced tensor
    ops; the CPU value checks are skipped while compiling) and gives eager's result."""
    g = torch.Generator().manual_seed(5)
    kc, vc = (torch.randn(3, 20, 2, 32, generator=g) for _ in range(2))
    q, k, v = torch.randn(2, 1, 4, 32, generator=g), torch.randn(2, 1, 2, 32, generator=g), torch.randn(2, 1, 2, 32,
                                                                                                          generator=g)
    angle = torch.rand(20, 8, generator=g) * 6.3
    kw = dict(rotary_cos=angle.cos(), rotary_sin=angle.sin(), cache_seqlens=torch.tensor([7, 12], dtype=torch.int32),
              cache_batch_idx=torch.tensor([2, 0], dtype=torch.int32),
              cache_leftpad=torch.tensor([1, 4], dtype=torch.int32), causal=True, rotary_interleaved=False)
    caches = [(kc.clone(), vc.clone()) for _ in range(2)]
    eager = fa.flash_attn_with_kvcache(q, *caches[0], k, v, **kw)
    compiled = torch.compile(fa.flash_attn_with_kvcache, dynamic=True)(q, *caches[1], k, v, **kw)
    assert torch.equal(eager, compiled)
    assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])


@pytest.mark.parametrize("B,Bc,cap", [(0, 0, 8), (0, 2, 8), (2, 3, 0), (2, 2, 0)])
def test_empty_batches_and_caches(B, Bc, cap):
    """No sequences, or caches without rows: the arguments are checked and the call returns empty
    or all-zero rows (lse -inf), as without them (the paged translation needs at least one page)."""
    q = torch.randn(B, 2, 4, 16)
    kc, vc = torch.randn(Bc, cap, 2, 16), torch.randn(Bc, cap, 2, 16)
    kw = dict(cache_seqlens=torch.zeros(B, dtype=torch.int32), cache_leftpad=torch.zeros(B, dtype=torch.int32),
              return_softmax_lse=True)
    if B <= Bc:  # (every case: a cache of another batch size needs cache_batch_idx)
        kw["cache_batch_idx"] = torch.arange(B, dtype=torch.int32)
    out, lse = fa.flash_attn_with_kvcache(q, kc, vc, **kw)
    assert out.shape == q.shape and lse.shape == (B, 4, 2)
    assert (out == 0).all() and torch.isinf(lse).all()
    if B:  # (tables of the caches' 0 rows place no query: an error)
        k, cos = torch.randn(B, 0, 2, 16), torch.ones(cap, 4)
        with pytest.raises(ValueError, match=r"rotary_cos and rotary_sin have no positions \(seqlen_ro = 0\)"):
            fa.flash_attn_with_kvcache(q, kc, vc, k, k, rotary_cos=cos, rotary_sin=cos, **kw)
        out = fa.flash_attn_with_kvcache(q, kc, vc, k, k, rotary_cos=torch.ones(1, 4), rotary_sin=torch.ones(1, 4),
                                         **kw)[0]
        assert (out == 0).all()


def test_rotary_tables_too_short_for_the_queries():
    """Queries past the rotary tables are an error on the CPU, where each query sits (causal or
    local) or where all of a sequence's sit (otherwise), and with tables of no rows."""
    kc, vc = torch.zeros(2, 8, 2, 16), torch.zeros(2, 8, 2, 16)
    q, k = torch.randn(2, 1, 4, 16), torch.randn(2, 0, 2, 16)
    cos = torch.ones(8, 4)
    for causal in (False, True):
        where = r"cache_seqlens\[1\] \+ seqlen_q - 1" if causal else r"cache_seqlens\[1\]"
        with pytest.raises(ValueError, match=r"rotary_cos and rotary_sin have 8 positions, but the last query of "
                                             rf"sequence 1 is at position {where} = 8"):
            fa.flash_attn_with_kvcache(q, kc, vc, k, k, rotary_cos=cos, rotary_sin=cos, causal=causal,
                                       cache_seqlens=torch.tensor([3, 8], dtype=torch.int32))
    empty = torch.ones(0, 4)
    with pytest.raises(ValueError, match=r"rotary_cos and rotary_sin have no positions \(seqlen_ro = 0\)"):
        fa.flash_attn_with_kvcache(q, kc[:, :0], vc[:, :0], k, k, rotary_cos=empty, rotary_sin=empty, cache_seqlens=0)


def test_rotary_tables_too_short_for_the_queries_compiled():
    """Compiled on the CPU (the lengths not read on the host there): queries past the rotary
    tables still fail, as the graph runs (their positions were clamped to the tables' last row: a
    silently wrong result, found by an audit); tables long enough give eager's result."""
    g = torch.Generator().manual_seed(4)
    kc, vc = torch.randn(1, 8, 2, 16, generator=g), torch.randn(1, 8, 2, 16, generator=g)
    q, k, v = torch.randn(1, 4, 2, 16, generator=g), torch.randn(1, 2, 2, 16, generator=g), torch.randn(1, 2, 2, 16)
    angles = torch.arange(16.0)[:, None] * torch.rand(4, generator=g)[None]
    fn = torch.compile(lambda q, kc, vc, k, v, lens, cos, sin, causal: fa.flash_attn_with_kvcache(
        q, kc, vc, k, v, rotary_cos=cos, rotary_sin=sin, cache_seqlens=lens, causal=causal), fullgraph=True,
        backend="eager")
    lens = torch.tensor([6], dtype=torch.int32)
    cos, sin = angles[:8].cos(), angles[:8].sin()  # 8 rows, the cache's capacity
    # causal: the 4 queries at positions 6..9 after 2 new keys; else all at the full cache's 8
    for causal, new, at in ((True, 2, 6), (False, 0, 8)):
        torch._dynamo.reset()
        with pytest.raises(RuntimeError, match=r"^flash_attn_with_kvcache: rotary_cos and rotary_sin have fewer "
                                               r"positions than the last query of a sequence \(cache_seqlens"
                                               + (r" \+ seqlen_q - 1" if causal else "") + r"\) needs"):
            fn(q, kc.clone(), vc.clone(), k[:, :new], v[:, :new], torch.tensor([at], dtype=torch.int32), cos, sin,
               causal)
    # a length out of range is blamed on cache_seqlens, not on the tables (its check runs first)
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match=r"^flash_attn_with_kvcache: cache_seqlens is out of range: it must be in "
                                           r"\[0, seqlen_cache - seqlen_new\]"):
        fn(q, kc.clone(), vc.clone(), k, v, torch.tensor([7], dtype=torch.int32), cos, sin, True)
    cos, sin = angles.cos(), angles.sin()
    torch._dynamo.reset()
    want = fa.flash_attn_with_kvcache(q, kc.clone(), vc.clone(), k, v, rotary_cos=cos, rotary_sin=sin,
                                      cache_seqlens=lens, causal=True)
    assert torch.equal(fn(q, kc.clone(), vc.clone(), k, v, lens, cos, sin, True), want)


def test_tensors_that_require_grad_are_constants():
    """Like FlashAttention's kvcache call (no autograd), every tensor that requires grad is read as
    a constant, the rotary tables included (they were taken for q requiring grad)."""
    g = torch.Generator().manual_seed(3)
    kc, vc = torch.randn(2, 8, 2, 16, generator=g), torch.randn(2, 8, 2, 16, generator=g)
    q, k, v = torch.randn(2, 1, 4, 16, generator=g), torch.randn(2, 1, 2, 16, generator=g), torch.randn(
        2, 1, 2, 16, generator=g)
    angle = torch.rand(8, 8, generator=g)
    lens = torch.tensor([2, 5], dtype=torch.int32)
    want = fa.flash_attn_with_kvcache(q, kc.clone(), vc.clone(), k, v, rotary_cos=angle.cos(), rotary_sin=angle.sin(),
                                      cache_seqlens=lens, cache_leftpad=torch.tensor([1, 0], dtype=torch.int32))
    leaves = [x.clone().requires_grad_() for x in (q, k, v, angle.cos(), angle.sin())]
    out = fa.flash_attn_with_kvcache(leaves[0], kc.clone(), vc.clone(), leaves[1], leaves[2], rotary_cos=leaves[3],
                                     rotary_sin=leaves[4], cache_seqlens=lens,
                                     cache_leftpad=torch.tensor([1, 0], dtype=torch.int32))
    assert not out.requires_grad and torch.equal(out, want)


def test_windows_as_flash_attention_hands_them_to_its_kernels():
    """FlashAttention-2's bindings set a window bound of at least the keys' length (seqlen_k;
    max_seqlen_k for varlen, the cache's capacity for kvcache) to -1, then bound a window open on
    the right at seqlen_k where its left is bounded. Where queries outnumber keys (4 against 2),
    key j holding the value 10^j shows what query 0 sees: (-1, 2) both keys (the window's formula
    would hide key 1), (1, -1) and (1, 2) key 0 alone (unbounded on the right would show both),
    (-1, 1) none."""
    q = torch.zeros(1, 4, 1, 16)
    k = torch.zeros(1, 2, 1, 16)
    v = torch.tensor([1.0, 10.0]).reshape(1, 2, 1, 1).expand(1, 2, 1, 16).contiguous()
    cu = torch.tensor([0, 4], dtype=torch.int32), torch.tensor([0, 2], dtype=torch.int32)
    for window, seen in (((-1, 2), 5.5), ((1, -1), 1.0), ((1, 2), 1.0), ((5, 2), 5.5), ((-1, 1), 0.0)):
        for out in (fa.flash_attn_func(q, k, v, window_size=window)[0],
                    fa.flash_attn_varlen_func(q[0], k[0], v[0], *cu, 4, 2, window_size=window),
                    fa.flash_attn_with_kvcache(q, k, v, window_size=window)[0]):
            assert out[0, 0, 0].item() == seen, (window, out[0, 0, 0].item())
    for window, want in (((-1, 2), (-1, -1)), ((1, -1), (1, 2)), ((1, 2), (1, 2)), ((5, 2), (-1, -1)), ((0, 0), (0, 0))):
        assert fa2_window(window, 2) == want


def test_leftpad_with_a_cache_whose_heads_are_outside_its_rows():
    """A cache whose memory is (batch, nheads_k, seqlen, headdim) (a transposed view): cache_leftpad
    is the kernels' own argument, so any strides work (until 2026-12-06 it ran as a paged call of
    one-row pages and refused this layout), alone and with cache_batch_idx; the append in place."""
    g = torch.Generator().manual_seed(3)
    kc, vc = (torch.randn(2, 2, 8, 16, generator=g).transpose(1, 2) for _ in range(2))
    q, k, v = (torch.randn(2, 1, 2, 16, generator=g) for _ in range(3))
    pad, lens = torch.tensor([1, 0], dtype=torch.int32), torch.tensor([4, 6], dtype=torch.int32)
    for idx in (None, torch.tensor([1, 0], dtype=torch.int32)):
        k1, v1 = kc.clone(), vc.clone()
        out = fa.flash_attn_with_kvcache(q, k1, v1, k, v, cache_seqlens=lens, cache_leftpad=pad, cache_batch_idx=idx)
        rows = [0, 1] if idx is None else idx.tolist()
        for b in range(2):
            n, p = int(lens[b]), int(pad[b])
            assert torch.equal(k1[rows[b], n], k[b, 0]) and torch.equal(v1[rows[b], n], v[b, 0])
            keys, vals = k1[rows[b], p:n + 1], v1[rows[b], p:n + 1]
            ref = torch.softmax(torch.einsum("hd,nhd->hn", q[b, 0].double(), keys.double()) / 4, -1)
            ref = torch.einsum("hn,nhd->hd", ref, vals.double())
            torch.testing.assert_close(out[b, 0].double(), ref, atol=1e-5, rtol=0)


def bad_args(**over):
    g = torch.Generator().manual_seed(0)
    args = dict(q=torch.randn(2, 1, 4, 16, generator=g), k_cache=torch.randn(3, 8, 2, 16, generator=g),
                v_cache=torch.randn(3, 8, 2, 16, generator=g), k=torch.randn(2, 1, 2, 16, generator=g),
                v=torch.randn(2, 1, 2, 16, generator=g), cache_seqlens=torch.tensor([2, 5], dtype=torch.int32),
                cache_batch_idx=torch.tensor([2, 0], dtype=torch.int32))
    args.update(over)
    return args


def bad(**over):
    return fa.flash_attn_with_kvcache(**bad_args(**over))


COS = torch.ones(8, 4)
I32 = lambda *x: torch.tensor(x, dtype=torch.int32)  # noqa: E731


@pytest.mark.parametrize("over,exc,match", [
    (dict(block_table=I32([0], [1])), ValueError, r"cache_batch_idx indexes a contiguous cache; a paged one"),
    (dict(cache_batch_idx=None, cache_leftpad=I32(0, 0), block_table=I32([0], [1])), ValueError,
     r"cache_leftpad indexes a contiguous cache"),
    (dict(cache_batch_idx=None), ValueError, r"k_cache must be \(batch, seqlen_cache, nheads_k, headdim\) with the "
                                             r"batch of q \(2\), got \(3, 8, 2, 16\).*cache_batch_idx"),
    (dict(cache_batch_idx=I32(3, 0)), ValueError, r"cache_batch_idx\[0\] = 3 is out of range: it must index the 3 "
                                                  r"sequences of k_cache"),
    (dict(cache_batch_idx=I32(-1, 0)), ValueError, r"cache_batch_idx\[0\] = -1 is out of range"),
    (dict(cache_batch_idx=I32(1, 1)), ValueError, r"cache_batch_idx\[0\] = cache_batch_idx\[1\] = 1: both sequences "
                                                  r"would append"),
    (dict(cache_batch_idx=torch.tensor([1, 0])), TypeError, r"cache_batch_idx must be int32, got torch.int64"),
    (dict(cache_batch_idx=I32(1)), ValueError, r"cache_batch_idx must have shape \(batch,\) = \(2,\), got \(1,\)"),
    (dict(cache_batch_idx=[1, 0]), TypeError, r"cache_batch_idx must be an int32 tensor \(batch,\) or None, got list"),
    (dict(cache_leftpad=I32(3, 0)), ValueError, r"cache_leftpad\[0\] = 3 is out of range: it must be in "
                                                r"\[0, cache_seqlens\[0\] = 2\] \(sequence 0's keys are cache rows "
                                                r"cache_leftpad\[0\] \.\. cache_seqlens\[0\] \+ seqlen_new - 1\)$"),
    (dict(cache_leftpad=I32(0, -1)), ValueError, r"cache_leftpad\[1\] = -1 is out of range"),
    (dict(cache_leftpad=I32(0, 1), cache_seqlens=I32(2, 8)), ValueError,
     r"cache_seqlens\[1\] = 8 is out of range: it must be in \[0, 7\] for a cache of 8 keys per sequence with room "
     r"for the 1 new keys"),
    (dict(cache_leftpad=I32(0, 1), cache_seqlens=2.0), TypeError, r"cache_seqlens must be an int32 tensor"),
    (dict(rotary_cos=COS), ValueError, r"rotary_sin must be given with rotary_cos"),
    (dict(rotary_sin=COS), ValueError, r"rotary_cos must be given with rotary_sin"),
    (dict(rotary_cos=COS, rotary_sin=COS, k=None, v=None), ValueError, r"rotary_cos and rotary_sin need k and v"),
    (dict(rotary_cos=COS.double(), rotary_sin=COS), TypeError, r"rotary_cos must have the dtype of q "
                                                               r"\(torch.float32\), got torch.float64"),
    (dict(rotary_cos=torch.ones(7, 4), rotary_sin=torch.ones(7, 4)), ValueError,
     r"rotary_cos must be \(seqlen_ro, rotary_dim / 2\) with seqlen_ro at least the cache's 8 positions and "
     r"rotary_dim at most headdim \(16\), got \(7, 4\)"),
    (dict(rotary_cos=torch.ones(8, 9), rotary_sin=torch.ones(8, 9)), ValueError, r"rotary_cos must be .*rotary_dim "
                                                                                 r"at most headdim \(16\), got \(8, 9\)"),
    (dict(q=torch.randn(2, 3, 4, 16), rotary_cos=COS, rotary_sin=COS, causal=True, cache_seqlens=I32(2, 6)), ValueError,
     r"rotary_cos and rotary_sin have 8 positions, but the last query of sequence 1 is at position "
     r"cache_seqlens\[1\] \+ seqlen_q - 1 = 8"),
    (dict(rotary_cos=COS, rotary_sin=torch.ones(9, 4)), ValueError, r"rotary_sin must have the shape of rotary_cos "
                                                                   r"\(8, 4\), got \(9, 4\)"),
    (dict(rotary_cos=COS, rotary_sin="x"), TypeError, r"rotary_sin must be a torch.Tensor or None, got str"),
    (dict(rotary_cos=COS, rotary_sin=COS, rotary_interleaved="yes"), TypeError, r"rotary_interleaved must be a bool"),
])
def test_bad_input(over, exc, match):
    with pytest.raises(exc, match=r"^flash_attn_with_kvcache: " + match):
        bad(**over)


def test_cache_batch_idx_in_the_caches_memory_is_refused_by_its_name():
    """A cache_batch_idx that is a view of k_cache's memory is refused as flash_cuda refuses a
    block table there (the table a cache_batch_idx becomes), under its own name: the message
    named block_table, which the caller never passed (a review)."""
    args = bad_args()
    idx = args["k_cache"].view(torch.int32)[2, 7, 1, :2]
    idx.copy_(I32(2, 0))
    before = args["k_cache"].clone()
    with pytest.raises(ValueError, match=r"^flash_attn_with_kvcache: cache_batch_idx shares memory with k_cache"):
        fa.flash_attn_with_kvcache(**dict(args, cache_batch_idx=idx))
    assert torch.equal(args["k_cache"], before)


def test_bad_cache_batch_idx_compiled():
    """Compiled on the CPU, cache_batch_idx out of range or shared by sequences that append still
    fails in its own name, as the graph runs (the op named the block table built from it, an audit's
    finding); the valid call and a shared index with nothing appended equal eager."""
    fn = torch.compile(lambda **kw: fa.flash_attn_with_kvcache(**kw), fullgraph=True, backend="eager")
    for over, match in ((dict(cache_batch_idx=I32(3, 0)), r"cache_batch_idx is out of range: it must index the "
                                                          r"sequences of k_cache \(dim 0\)"),
                        (dict(cache_batch_idx=I32(-1, 0)), r"cache_batch_idx is out of range"),
                        (dict(cache_batch_idx=I32(1, 1)), r"two sequences with the same cache_batch_idx would append")):
        torch._dynamo.reset()
        with pytest.raises(RuntimeError, match=r"^flash_attn_with_kvcache: " + match):
            fn(**bad_args(**over))
    for over in ({}, dict(cache_batch_idx=I32(1, 1), k=None, v=None)):
        torch._dynamo.reset()
        assert torch.equal(fn(**bad_args(**over)), bad(**over))


def test_nothing_is_written_before_an_error():
    """A rejected call leaves the caches as they were."""
    g = torch.Generator().manual_seed(0)
    kc, vc = torch.randn(3, 8, 2, 16, generator=g), torch.randn(3, 8, 2, 16, generator=g)
    before = kc.clone(), vc.clone()
    with pytest.raises(ValueError):
        bad(k_cache=kc, v_cache=vc, cache_leftpad=I32(0, 6))
    with pytest.raises(ValueError):
        bad(k_cache=kc, v_cache=vc, cache_batch_idx=I32(1, 1))
    assert torch.equal(kc, before[0]) and torch.equal(vc, before[1])


def paged_varlen_case(seed, dtypes=(torch.float32, torch.float16, torch.bfloat16)):
    """Packed queries against keys in a shuffled paged pool: (q, k_pool, v_pool, table, cu_q, cu_k,
    max_q, max_k, kwargs, dtype, the keys of each sequence as (page, row) pairs)."""
    rnd, g = random.Random(seed), torch.Generator().manual_seed(seed)
    dtype = rnd.choice(dtypes)
    B, hkv, group, D = rnd.randint(1, 4), rnd.randint(1, 2), rnd.choice([1, 2]), rnd.choice([16, 32, 40])
    page_size, blocks = rnd.choice([1, 3, 16]), rnd.randint(1, 4)
    lens_k = [rnd.choice([0, blocks * page_size, rnd.randint(0, blocks * page_size)]) for _ in range(B)]
    lens_q = [rnd.randint(0, 6) for _ in range(B)]
    num_blocks = B * blocks + 2
    if rnd.random() < 0.5:  # pages of their own, or drawn with repeats (a shared prefix, a page twice)
        table = torch.randperm(num_blocks, generator=g)[:B * blocks].reshape(B, blocks).to(torch.int32)
    else:
        table = torch.randint(0, num_blocks, (B, blocks), generator=g, dtype=torch.int32)
    for b in range(B):  # entries past a sequence's pages hold anything
        if rnd.random() < 0.5:
            table[b, -(-lens_k[b] // page_size):] = rnd.choice([-1, 10**6])
    kp, vp = (torch.randn(num_blocks, page_size, hkv, D, generator=g).to(dtype) for _ in range(2))
    q = torch.randn(sum(lens_q), hkv * group, D, generator=g).to(dtype)
    cu = lambda lens: torch.tensor([0] + lens, dtype=torch.int32).cumsum(0).to(torch.int32)  # noqa: E731
    kw = rnd.choice([{}, dict(causal=True), dict(window_size=(3, 1)), dict(softcap=5.0, causal=True),
                     dict(window_size=(rnd.randint(0, 4), -1)), dict(window_size=(-1, rnd.randint(0, 70))),
                     dict(alibi_slopes=torch.rand(hkv * group, generator=g) * 0.3),
                     dict(alibi_slopes=torch.rand(B, hkv * group, generator=g) * 0.3)])
    where = [[(table[b, n // page_size].item(), n % page_size) for n in range(lens_k[b])] for b in range(B)]
    max_k = max(lens_k) + rnd.randint(0, 2)
    if "window_size" in kw:  # (the window FlashAttention-2's kernels get, for the reference)
        kw["reference_window"] = fa2_window(kw["window_size"], max_k)
    return q, kp, vp, table, cu(lens_q), cu(lens_k), max(lens_q), max_k, kw, dtype, where


def paged_varlen_reference(q, kp, vp, cu_q, where, rdtype, kw):
    """Per sequence, attention_ref over its keys read page by page (float64 leaves for gradients):
    out (total_q, H, D) and lse (H, total_q)."""
    outs, lses = [], []
    slopes = kw.get("alibi_slopes")
    ref_kw = dict(causal=kw.get("causal", False), softcap=kw.get("softcap", 0.0), window=kw.get("reference_window"))
    for b, rows in enumerate(where):
        qb = q[cu_q[b]:cu_q[b + 1]]
        kb = torch.stack([kp[p, r] for p, r in rows]) if rows else kp[:0, 0]
        vb = torch.stack([vp[p, r] for p, r in rows]) if rows else vp[:0, 0]
        sl = slopes if slopes is None or slopes.dim() == 1 else slopes[b]
        o, lse = attention_ref(qb.transpose(0, 1)[None], kb.transpose(0, 1)[None], vb.transpose(0, 1)[None],
                               dtype=rdtype, alibi_slopes=sl, **ref_kw)
        outs.append(o[0].transpose(0, 1))
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, -1)


@pytest.mark.parametrize("seed", range(60))
def test_varlen_with_block_table_against_the_reference(seed):
    """flash_attn_varlen_func with block_table (FlashAttention-2's paged varlen keys): outputs, and
    gradients of q and of the pools (which the gather passes back to the pages the sequences
    use, zero elsewhere), against the float64 reference reading each key from its page."""
    q, kp, vp, table, cu_q, cu_k, max_q, max_k, kw, dtype, where = paged_varlen_case(
        seed, (torch.float32, torch.float64, torch.float16, torch.bfloat16))
    leaves = [x.clone().requires_grad_() for x in (q, kp, vp)]
    call = {name: x for name, x in kw.items() if name != "reference_window"}
    out, lse, _ = fa.flash_attn_varlen_func(*leaves, cu_q, cu_k, max_q, max_k, block_table=table,
                                            return_attn_probs=True, **call)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    grads = torch.autograd.grad(out, leaves, dout, allow_unused=True)
    results = {}
    for name, rdtype in (("ref", torch.float64), ("plain", dtype)):
        ref_leaves = [x.detach().to(rdtype).requires_grad_() for x in (q, kp, vp)]
        ref, ref_lse = paged_varlen_reference(*ref_leaves, cu_q, where, rdtype, kw)
        results[name] = (ref, ref_lse, torch.autograd.grad(ref, ref_leaves, dout.to(rdtype), allow_unused=True))
    zero = lambda g_, like: torch.zeros_like(like) if g_ is None else g_  # noqa: E731
    finite = torch.isfinite(results["ref"][1])
    assert torch.equal(torch.isinf(lse), ~finite), f"seed {seed}: rows without keys"
    # the standard's saturated-softmax term: the gradients of -sum_i delta_i lse_i, delta_i =
    # rowsum(dO (O_rounded - O_exact)), what FlashAttention's D_i on the rounded O adds
    sat_leaves = [x.detach().double().requires_grad_() for x in (q, kp, vp)]
    sat_o, sat_lse = paged_varlen_reference(*sat_leaves, cu_q, where, torch.float64, kw)
    delta = (dout.double() * (out.detach().double() - sat_o.detach())).sum(-1).t()  # (H, total_q)
    saturation = torch.autograd.grad(-(delta * torch.where(finite, sat_lse, 0)).sum(), sat_leaves, allow_unused=True)
    pairs = [("out", out, results["ref"][0], results["plain"][0], 2, None),
             ("lse", lse[finite], results["ref"][1][finite], results["plain"][1][finite], 2, None)] + [
        (name, zero(a, x), zero(r, x).double(), zero(p, x), 3, zero(sat, x))
        for name, a, r, p, x, sat in zip(("dq", "dk_pool", "dv_pool"), grads, results["ref"][2], results["plain"][2],
                                         (q, kp, vp), saturation)]
    for name, ours, ref, plain, factor, sat in pairs:
        if dtype in (torch.float32, torch.float64):
            assert_close_fp(f"seed {seed}: {name}", ours, ref, rtol=5e-5 if dtype == torch.float32 else 1e-12)
        else:
            assert_fa_rule(f"seed {seed}: {name}", ours, plain, ref, factor, sat)
    used = torch.zeros(kp.shape[:2], dtype=torch.bool)
    for rows in where:
        for p, r in rows:
            used[p, r] = True
    assert (zero(grads[1], kp)[~used] == 0).all() and (zero(grads[2], vp)[~used] == 0).all()


@pytest.mark.parametrize("seed", range(3))
def test_emulated_varlen_with_block_table(seed):
    """The same forward through the CUDA kernels in the emulator (fp16/bf16)."""
    q, kp, vp, table, cu_q, cu_k, max_q, max_k, kw, dtype, where = paged_varlen_case(
        50 + seed, (torch.float16, torch.bfloat16))
    call = {name: x for name, x in kw.items() if name != "reference_window"}
    with flash_cuda.emulate():
        out = fa.flash_attn_varlen_func(q, kp, vp, cu_q, cu_k, max_q, max_k, block_table=table, **call)
    ref = paged_varlen_reference(q, kp, vp, cu_q, where, torch.float64, kw)[0]
    plain = paged_varlen_reference(q, kp, vp, cu_q, where, dtype, kw)[0]
    assert_fa_rule(f"seed {seed}: out", out, plain, ref, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("seed", range(6))
def test_cuda_varlen_with_block_table(seed):
    """The paged varlen forward on a GPU (fp16/bf16): the gather sized B x max_seqlen_k there."""
    q, kp, vp, table, cu_q, cu_k, max_q, max_k, kw, dtype, where = paged_varlen_case(
        80 + seed, (torch.float16, torch.bfloat16))
    call = {name: x.cuda() if isinstance(x, torch.Tensor) else x for name, x in kw.items() if name != "reference_window"}
    out = fa.flash_attn_varlen_func(q.cuda(), kp.cuda(), vp.cuda(), cu_q.cuda(), cu_k.cuda(), max_q, max_k,
                                    block_table=table.cuda(), **call).cpu()
    ref = paged_varlen_reference(q, kp, vp, cu_q, where, torch.float64, kw)[0]
    plain = paged_varlen_reference(q, kp, vp, cu_q, where, dtype, kw)[0]
    assert_fa_rule(f"seed {seed}: out", out, plain, ref, 2)


def varlen_args(**over):
    g = torch.Generator().manual_seed(0)
    args = dict(q=torch.randn(5, 4, 16, generator=g), k=torch.randn(6, 4, 2, 16, generator=g),
                v=torch.randn(6, 4, 2, 16, generator=g), cu_seqlens_q=I32(0, 2, 5), cu_seqlens_k=I32(0, 7, 9),
                max_seqlen_q=3, max_seqlen_k=7, block_table=I32([0, 3], [5, 1]))
    args.update(over)
    return args


def bad_varlen(**over):
    return fa.flash_attn_varlen_func(**varlen_args(**over))


@pytest.mark.parametrize("over,exc,match", [
    (dict(block_table=[[0, 3], [5, 1]]), TypeError, r"block_table must be an int32 tensor \(batch, max_num_blocks\) "
                                                   r"or None, got list"),
    (dict(block_table=I32(0, 3)), TypeError, r"block_table must be a dense int32 tensor \(batch, max_num_blocks\), "
                                             r"got torch.int32 of shape \(2,\)"),
    (dict(k=torch.randn(24, 2, 16)), ValueError, r"k must be 4-D \(num_blocks, page_block_size, nheads_k, headdim\)"),
    (dict(v=torch.randn(6, 2, 2, 16)), ValueError, r"v must have the shape of k \(6, 4, 2, 16\)"),
    (dict(cu_seqlens_k=I32(0, 7)), ValueError, r"cu_seqlens_k must be \(batch \+ 1,\) = \(3,\) for the 2 rows of "
                                               r"block_table, got \(2,\)"),
    (dict(cu_seqlens_k=torch.tensor([0, 7, 9])), TypeError, r"cu_seqlens_k must be int32, got torch.int64"),
    (dict(max_seqlen_k=6), ValueError, r"max_seqlen_k 6 is smaller than the longest sequence \(7\) of cu_seqlens_k"),
    (dict(max_seqlen_k=-1), TypeError, r"max_seqlen_k must be a non-negative int"),
    (dict(cu_seqlens_k=I32(0, 9, 10), max_seqlen_k=9), ValueError,
     r"sequence 0 has 9 keys \(cu_seqlens_k\), more than the 8 rows of its 2 blocks"),
    (dict(block_table=I32([0, 6], [5, 1])), ValueError, r"block_table\[0, 1\] = 6 points outside the pool of 6 blocks "
                                                        r"\(k.shape\[0\]\) but sequence 0 uses that block"),
    (dict(block_table=I32([0, 3], [-1, 1])), ValueError, r"block_table\[1, 0\] = -1 points outside the pool"),
    (dict(cu_seqlens_k=I32(1, 7, 9)), ValueError, r"cu_seqlens_k must start at 0, got 1"),
    (dict(max_seqlen_k=2**31), ValueError, r"max_seqlen_k must be at most 2\*\*31 - 1"),
    (dict(k=torch.randn(6, 4, 2, 8), v=torch.randn(6, 4, 2, 8)), ValueError,
     r"k must be a paged pool \(num_blocks, page_block_size, nheads_k, headdim\) with the headdim of q \(16\) and "
     r"nheads_k dividing its nheads \(4\), got \(6, 4, 2, 8\)"),
])
def test_bad_varlen_block_table(over, exc, match):
    with pytest.raises(exc, match=r"^flash_attn_varlen_func: " + match):
        bad_varlen(**over)


def test_bad_varlen_block_table_compiled():
    """Compiled on the CPU, where the checks cannot read the table and lengths on the host without
    breaking the graph: the same bad input still fails, as the graph runs, naming the argument (the
    gather clamps its indices, and a table past the pool gave a silently wrong result before). The
    valid call compiled equals eager."""
    compiled = torch.compile(lambda **kw: fa.flash_attn_varlen_func(**kw), fullgraph=True, backend="eager")

    def fn(**over):
        return compiled(**varlen_args(**over))

    torch._dynamo.reset()
    assert torch.equal(fn(), bad_varlen())
    for over, match in ((dict(block_table=I32([0, 6], [5, 1])), r"block_table points outside the pool of blocks "
                                                                r"\(k.shape\[0\]\) in a block that its sequence uses"),
                        (dict(block_table=I32([0, 3], [-1, 1])), r"block_table points outside the pool"),
                        (dict(cu_seqlens_k=I32(0, 9, 10), max_seqlen_k=9),
                         r"a sequence has more keys \(cu_seqlens_k\) than the rows of its blocks"),
                        (dict(max_seqlen_k=6), r"max_seqlen_k is smaller than the longest sequence of cu_seqlens_k")):
        torch._dynamo.reset()
        with pytest.raises(RuntimeError, match=r"^flash_attn_varlen_func: " + match):
            fn(**over)
    # entries past a sequence's keys may still hold anything (as eager: vLLM's padded tables)
    torch._dynamo.reset()
    assert torch.equal(fn(block_table=I32([0, -1], [5, 99]), cu_seqlens_k=I32(0, 4, 6), max_seqlen_k=4),
                       bad_varlen(block_table=I32([0, 3], [5, 1]), cu_seqlens_k=I32(0, 4, 6), max_seqlen_k=4))


def test_varlen_block_table_without_columns():
    """A table of no columns with sequences of no keys (a batch of queries only): their rows see
    nothing (out 0); the gather had indexed column -1 of the empty table."""
    out = bad_varlen(block_table=torch.zeros(2, 0, dtype=torch.int32), cu_seqlens_k=I32(0, 0, 0), max_seqlen_k=3)
    assert out.shape == (5, 4, 16) and (out == 0).all()


def test_varlen_block_table_entries_past_the_lengths_are_not_read():
    """Entries of block_table past a sequence's keys may hold anything (-1, past the pool), as in
    vLLM's padded tables: the result equals the call with valid entries there."""
    want = bad_varlen(block_table=I32([0, 3], [5, 1]), cu_seqlens_k=I32(0, 4, 6), max_seqlen_k=4)
    assert torch.equal(bad_varlen(block_table=I32([0, -1], [5, 99]), cu_seqlens_k=I32(0, 4, 6), max_seqlen_k=4), want)
