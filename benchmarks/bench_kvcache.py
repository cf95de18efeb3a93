"""Decoding with a KV cache: flash_cuda.attention_with_kvcache against torch SDPA, side by side in
one process.

Each point is one decoding step: B sequences, one new query token each (Nq = 1), 32 query heads
over 8 kv heads (GQA), head dim 128, every sequence's cache holding Nk keys, contiguous
(B, Hkv, Nk, D). Implementations, on the same tensors:

    flash_cuda   attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=Nk): split-KV with the
                 query heads of a kv group packed into one tile (num_splits chosen for the device)
    sdpa         torch.nn.functional.scaled_dot_product_attention(q, k_cache, v_cache,
                 enable_gqa=True): whichever backend torch picks for it
    sdpa_packed  the same SDPA with the query heads of a kv group packed into its rows, as
                 flash_cuda packs them: q viewed as (B, Hkv, (Hq / Hkv) Nq, D) against the caches
                 as they are, no GQA, the output reshaped back (no copy where it is contiguous;
                 the same result wherever no causal mask is applied, as at every point here).
                 Torch's CPU kernel takes one query head at a time under enable_gqa, a tile of one
                 row at Nq = 1; packed, it fills its tiles as flash_cuda does (a review found the
                 plain call up to 13x slower than packed on one CPU thread). The ratio reported
                 against SDPA is against the faster of the two forms where the packed one's error
                 is within 4x the plain one's + 1e-5, each form's time stored too.

Reported: median time of interleaved calls after a warm-up (bench_sdpa.py's timing), tokens per
second (B Nq / time), and the bandwidth achieved on the cache, 2 B Hkv Nk D bytes per step (the
bytes decoding must read), against the machine's: on a GPU its peak from the device properties
(memory clock x bus width x 2), on the CPU a plain streaming read (sum of a tensor of the same
size) timed in the same interleaved rounds (a shared VM's bandwidth drifts within seconds). The
max |out - ref| against a float64 reference on sequence 0, for each implementation: a point whose
flash_cuda error passes 4x the better SDPA form's + 1e-5 is marked WRONG (bench_sdpa.py's rule). On the CPU also the ceiling the
multiplies put on the same bandwidth (multiply_peak.py: the cores' measured multiply-add rate over
the point's multiply-adds a byte, 2 (Hq / Hkv) Nq D a key for 2 D elements), the rate measured
before and after the point's rounds and the larger kept: where the ceiling is below the read, no
kernel on the backend's instructions reaches the read.
Points whose inputs do not fit the memory budget are skipped and listed. The machine (CPU model
and ISA flags, or GPU) is printed first and stored in the JSON.

    python benchmarks/bench_kvcache.py [--device cpu|cuda] [--json PATH] [--quick | --grid decode] [--leftpad]

--grid decode: issue 15's decoding grid instead, B = 1, Nq in {1, 4} new query tokens (all of
them attending to the whole cache: speculative decoding's verification step without its causal
mask, which SDPA would align top-left), Nk in {2048, 8192, 32768}, bf16, fp16 and fp32.

--leftpad: also flash_cuda with cache_leftpad in the same rounds: each sequence's Nk keys after a
pad of 1 to 64 rows (a different one per sequence) of a cache of Nk + 64 rows, the same keys and
values; reported as its time over the plain cache's (and the largest difference of the outputs).
"""
import argparse
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_masks as bm  # noqa: E402
import bench_sdpa as bs  # noqa: E402
import multiply_peak as mp  # noqa: E402

import flash_cuda  # noqa: E402

HQ, HKV, D = 32, 8, 128


def points(device, quick, grid=None):
    """(dtype, B, Nq, Nk) of each point."""
    if quick:
        return [(torch.float32, 1, 1, 1024), (torch.bfloat16, 2, 1, 1024)]
    if grid == "decode":
        dtypes = [torch.bfloat16, torch.float16] + ([] if device == "cuda" else [torch.float32])
        return [(dt, 1, nq, n) for dt in dtypes for nq in (1, 4) for n in (2048, 8192, 32768)]
    dtypes = [torch.bfloat16] if device == "cuda" else [torch.bfloat16, torch.float32]
    return [(dt, b, 1, n) for dt in dtypes for b in (1, 8, 64) for n in (1024, 8192, 32768)]


def budget_bytes(device):
    """Inputs a point may allocate: both caches once (SDPA's GQA may expand them on the fly)."""
    return bs.total_memory(device) // 8


class Call:
    """A no-grad call in bench_sdpa's Step interface (time_call resets around it)."""

    def __init__(self, fn):
        self.fn = fn

    def reset(self):
        pass

    def __call__(self):
        with torch.inference_mode():
            return self.fn()


def median_time(calls, device, reps):
    for c in calls.values():  # warm-up
        bs.time_call(c, device)
    times = {n: [] for n in calls}
    for _ in range(reps):
        for n, c in calls.items():
            times[n].append(bs.time_call(c, device))
    return {n: statistics.median(t) for n, t in times.items()}


def device_peak_bandwidth(device):
    """The GPU's peak bytes per second (memory clock x bus width x 2), or None (the CPU, or a GPU
    that does not report them): then a streaming read is timed beside the point instead."""
    if device != "cuda":
        return None
    p = torch.cuda.get_device_properties(0)
    clock_khz = getattr(p, "memory_clock_rate", 0)
    bus_bits = getattr(p, "memory_bus_width", 0)
    return 2 * clock_khz * 1e3 * bus_bits / 8 if clock_khz and bus_bits else None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None)
    ap.add_argument("--json", default=None)
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--quick", action="store_true", help="two small points (CI smoke run)")
    which.add_argument("--grid", choices=("decode",), default=None, help="issue 15's decoding grid (Nq 1 and 4)")
    ap.add_argument("--leftpad", action="store_true", help="also time a left-padded cache (cache_leftpad)")
    args = ap.parse_args(argv)
    device = bs.pick_device(ap, args.device)
    meta = bm.machine(device)
    print("machine:", json.dumps(meta), flush=True)
    results, skipped = [], []
    for dtype, B, NQ, N in points(device, args.quick, args.grid):
        cache_bytes = 2 * B * HKV * N * D * torch.finfo(dtype).bits // 8
        if cache_bytes > budget_bytes(device):
            skipped.append(dict(B=B, Nq=NQ, Nk=N, dtype=str(dtype).split(".")[-1], cache_gib=cache_bytes / 2 ** 30))
            continue
        q = torch.randn(B, HQ, NQ, D, device=device, dtype=dtype)
        kc, vc = (torch.randn(B, HKV, N, D, device=device, dtype=dtype) for _ in range(2))
        G = HQ // HKV  # the query heads of a kv group: kv head h serves query heads h G .. h G + G - 1
        calls = {"flash_cuda": Call(lambda: flash_cuda.attention_with_kvcache(q, kc, vc, cache_seqlens=N)),
                 "sdpa": Call(lambda: F.scaled_dot_product_attention(q, kc, vc, enable_gqa=True)),
                 "sdpa_packed": Call(lambda: F.scaled_dot_product_attention(
                     q.view(B, HKV, G * NQ, D), kc, vc).reshape(B, HQ, NQ, D))}  # (reshape: SDPA's
        # memory-efficient CUDA kernel returns a transposed layout, which view refused)
        pad_rows = 64
        padded = args.leftpad and cache_bytes * (N + pad_rows) // N * 2 <= budget_bytes(device)
        if padded:  # the same keys after a pad of 1 to 64 rows, a different one per sequence
            pad = torch.tensor([(37 * b + 5) % pad_rows + 1 for b in range(B)], dtype=torch.int32, device=device)
            kp, vp = (torch.zeros(B, HKV, N + pad_rows, D, device=device, dtype=dtype) for _ in range(2))
            for b in range(B):
                kp[b, :, int(pad[b]):int(pad[b]) + N], vp[b, :, int(pad[b]):int(pad[b]) + N] = kc[b], vc[b]
            lens = pad + N
            calls["flash_cuda_leftpad"] = Call(lambda: flash_cuda.attention_with_kvcache(
                q, kp, vp, cache_seqlens=lens, cache_leftpad=pad))
        out = calls["flash_cuda"]()
        pad_diff = (calls["flash_cuda_leftpad"]().double() - out.double()).abs().max().item() if padded else None
        ref = F.scaled_dot_product_attention(q[:1].double(), kc[:1].double(), vc[:1].double(), enable_gqa=True)
        err = (out[:1].double() - ref).abs().max().item()
        sdpa_errs = {n: (calls[n]()[:1].double() - ref).abs().max().item() for n in ("sdpa", "sdpa_packed")}
        # the packed form races only where it computes what the plain call does (no causal point
        # here, but the ratio must not rest on a faster wrong result)
        packed_ok = bs.wrong_status(sdpa_errs["sdpa_packed"], [sdpa_errs["sdpa"]]) == "ok"
        wrong = bs.wrong_status(err, sdpa_errs.values()) != "ok"
        # a plain read of as many bytes, timed in the same interleaved rounds: what the machine
        # reads in practice (on a GPU, beside its peak)
        x = torch.ones(max(cache_bytes // 4, 1), dtype=torch.float32, device=device)
        calls["read"] = Call(lambda: x.sum())
        # on the CPU, the multiply-add rate (multiply_peak.py) of the instruction the backend
        # multiplies with here, measured before and after the point's rounds, the larger kept:
        # the ceiling the multiplies put on the bandwidth (None on a GPU, or where the probe has
        # no kind). Not inside the rounds: run between them it slowed the calls after it (2k
        # keys: 2x, the threads woken anew), as it would any kernel timed beside it.
        kind = mp.instruction_kind(dtype, HQ // HKV * NQ) if device == "cpu" else None
        macs = mp.macs_per_second(kind) if kind else None
        reps = 5 if args.quick else (21 if device == "cpu" else 50)
        t = median_time(calls, device, reps)
        if macs:
            macs = max(macs, mp.macs_per_second(kind))
        read = x.numel() * 4 / t["read"]
        peak = device_peak_bandwidth(device)
        how = "peak (memory clock x bus width x 2)"
        if peak is None:
            peak, how = read, "streaming read (sum) of the same bytes, timed in the same interleaved rounds"
        del x
        ceiling = mp.decode_ceiling(dtype, HQ // HKV, NQ, macs) if macs else None
        sdpa_form = min(("sdpa", "sdpa_packed") if packed_ok else ("sdpa",), key=lambda n: t[n])  # the faster form
        r = {"dtype": str(dtype).split(".")[-1], "B": B, "Hq": HQ, "Hkv": HKV, "Nq": NQ, "Nk": N, "D": D,
             "status": "wrong" if wrong else "ok",
             "ours_ms": t["flash_cuda"] * 1e3, "sdpa_ms": t[sdpa_form] * 1e3, "sdpa_form": sdpa_form,
             "sdpa_gqa_ms": t["sdpa"] * 1e3, "sdpa_packed_ms": t["sdpa_packed"] * 1e3,
             "speed_ratio_sdpa_over_ours": t[sdpa_form] / t["flash_cuda"],
             "speed_ratio_sdpa_gqa_over_ours": t["sdpa"] / t["flash_cuda"],
             "ours_tokens_per_s": B * NQ / t["flash_cuda"], "sdpa_tokens_per_s": B * NQ / t[sdpa_form],
             "ours_gbps": cache_bytes / t["flash_cuda"] / 1e9, "sdpa_gbps": cache_bytes / t[sdpa_form] / 1e9,
             "sdpa_max_err": sdpa_errs["sdpa"], "sdpa_packed_max_err": sdpa_errs["sdpa_packed"],
             "machine_gbps": peak / 1e9, "machine_bandwidth": how, "read_gbps": read / 1e9, "max_err": err,
             "ceiling_gbps": ceiling / 1e9 if ceiling else None,
             "ceiling_instruction": mp.KINDS[kind][2] if ceiling else None}
        if padded:
            r.update(leftpad_ms=t["flash_cuda_leftpad"] * 1e3,
                     leftpad_over_plain=t["flash_cuda_leftpad"] / t["flash_cuda"], leftpad_max_diff=pad_diff)
            del kp, vp
        results.append(r)
        print(f"{r['dtype']:8s} B={B:<3d} Nq={NQ} Nk={N:<6d} ours {r['ours_ms']:8.3f} ms  sdpa {r['sdpa_gqa_ms']:8.3f} "
              f"ms (packed {r['sdpa_packed_ms']:8.3f})  ratio {r['speed_ratio_sdpa_over_ours']:5.2f}x (vs "
              f"{sdpa_form}; {r['speed_ratio_sdpa_gqa_over_ours']:5.2f}x vs sdpa)"
              + ("  WRONG" if wrong else "") + f"  tokens/s ours {r['ours_tokens_per_s']:9.0f} "
              f"sdpa {r['sdpa_tokens_per_s']:9.0f}  GB/s ours {r['ours_gbps']:7.1f} sdpa {r['sdpa_gbps']:7.1f} "
              f"machine {r['machine_gbps']:7.1f} read {r['read_gbps']:7.1f}"
              + (f" ceiling {r['ceiling_gbps']:7.1f}" if ceiling else "") + f"  err {err:.1e}"
              + (f"  leftpad {r['leftpad_ms']:8.3f} ms ({r['leftpad_over_plain']:.2f}x plain, diff "
                 f"{pad_diff:.1e})" if padded else ""), flush=True)
    for s in skipped:
        print(f"skipped (cache of {s['cache_gib']:.1f} GiB over the memory budget): {s}", flush=True)
    meta["skipped"] = skipped
    bm.save_json(args.json, meta, results)
    return results


if __name__ == "__main__":
    main()
