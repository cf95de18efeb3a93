"""Peak memory of a long-sequence forward+backward with flash_cuda on CPU.

Shows that flash_cuda.attention forward + backward at B=1, H=1, N=32768, D=64, float32
(non-causal unless --causal) runs with a peak resident set size under 1 GiB, although the
N x N float32 score matrix alone would need 4 GiB.

How it measures
    The work runs in fresh child processes (this script with --child), so nothing the
    parent did counts. The parent never imports torch and runs two children in turn:

    baseline   imports torch and flash_cuda, allocates the inputs q, k, v (requiring grad)
               and the output gradient, and exits;
    attention  the same, then out = flash_cuda.attention(q, k, v); out.backward(grad).

    After each child exits, the parent reads resource.getrusage(RUSAGE_CHILDREN).ru_maxrss
    (KiB on Linux). That value is the peak RSS of the largest child waited for so far, so
    the baseline runs first and the attention child (which does strictly more) second.
    Each child leaves with os._exit right after reporting: Python's normal interpreter
    teardown with torch loaded raises the RSS by ~130 MiB on its own (torch 2.14), a
    spike that would otherwise dominate both peaks.
    The report gives the attention child's peak RSS, the baseline's, and their difference,
    the memory attributable to attention. PASS means the attention child's whole peak RSS,
    torch itself included, stays under the limit (--limit-mib, default 1024); the exit
    code is 1 on FAIL.

Run (takes roughly 10-30 s on a 2-core CPU):
    python benchmarks/memory_long.py
    python benchmarks/memory_long.py --causal --n 65536 --json /tmp/memory_long.json
    python benchmarks/memory_long.py --threads 64     # as on a 64-core machine
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

KIB = 1024
MIB = 2 ** 20
GIB = 2 ** 30


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=32768, help="sequence length N (default: %(default)s)")
    p.add_argument("--d", type=int, default=64, help="head dim D (default: %(default)s)")
    p.add_argument("--causal", action="store_true", help="causal attention (default: non-causal)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads of the children (default: torch's own count)")
    p.add_argument("--limit-mib", type=float, default=1024,
                   help="limit for the peak RSS of the attention run, MiB (default: %(default)s)")
    p.add_argument("--json", metavar="PATH", help="also save the numbers as JSON to PATH")
    p.add_argument("--child", choices=("baseline", "attention"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- child

def child(args):
    """Runs in the child process; prints one JSON line with what it did."""
    import torch

    import flash_cuda

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = (1, 1, args.n, args.d)
    q, k, v = (torch.randn(shape, dtype=torch.float32, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, dtype=torch.float32)
    report = {"threads": torch.get_num_threads(), "torch_version": torch.__version__}
    if args.child == "attention":
        t0 = time.perf_counter()
        out = flash_cuda.attention(q, k, v, causal=args.causal)
        out.backward(grad)
        report["elapsed_s"] = time.perf_counter() - t0
        report["finite"] = all(bool(torch.isfinite(x).all()) for x in (out, q.grad, k.grad, v.grad))
    report["self_maxrss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps(report), flush=True)
    # Skip the interpreter teardown: with torch loaded it alone raises the peak RSS by
    # ~130 MiB (measured with torch 2.14), which would mask the work measured here.
    os._exit(0)


# ----------------------------------------------------------------------------- parent

def run_child(kind, args):
    """Run one child; return (its JSON report, RUSAGE_CHILDREN ru_maxrss in KiB afterwards)."""
    cmd = [sys.executable, __file__, "--child", kind, "--n", str(args.n), "--d", str(args.d),
           "--threads", str(args.threads)]
    if args.causal:
        cmd.append("--causal")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{kind} child failed (exit code {proc.returncode}):\n{proc.stderr}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return report, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        child(args)
        return 0

    t0 = time.perf_counter()
    base_report, base_kib = run_child("baseline", args)   # must run first, see docstring
    attn_report, peak_kib = run_child("attention", args)
    wall = time.perf_counter() - t0

    peak_mib, base_mib = peak_kib * KIB / MIB, base_kib * KIB / MIB
    scores_gib = args.n * args.n * 4 / GIB
    ok = peak_mib < args.limit_mib and attn_report["finite"]
    result = {
        "B": 1, "H": 1, "N": args.n, "D": args.d, "dtype": "float32", "causal": args.causal,
        "peak_rss_mib": peak_mib, "baseline_rss_mib": base_mib,
        "attention_rss_mib": peak_mib - base_mib, "score_matrix_gib": scores_gib,
        "elapsed_s": attn_report["elapsed_s"], "wall_s": wall, "limit_mib": args.limit_mib,
        "outputs_finite": attn_report["finite"], "pass": ok,
        "child_self_maxrss_mib": {"baseline": base_report["self_maxrss_kib"] * KIB / MIB,
                                  "attention": attn_report["self_maxrss_kib"] * KIB / MIB},
        "threads": attn_report["threads"], "torch_version": attn_report["torch_version"],
    }

    print(f"flash_cuda forward+backward, B=1 H=1 N={args.n} D={args.d} float32 "
          f"{'causal' if args.causal else 'non-causal'}, {result['threads']} threads")
    print(f"  peak RSS                           {peak_mib:8.1f} MiB")
    print(f"  baseline RSS (torch + inputs)      {base_mib:8.1f} MiB")
    print(f"  attributable to attention          {peak_mib - base_mib:8.1f} MiB")
    print(f"  N x N fp32 score matrix alone      {scores_gib:8.2f} GiB")
    print(f"  forward+backward elapsed           {result['elapsed_s']:8.1f} s")
    verdict = "PASS" if ok else "FAIL"
    why = "" if attn_report["finite"] else " (non-finite output or gradients)"
    print(f"{verdict}: peak RSS {peak_mib:.1f} MiB {'<' if peak_mib < args.limit_mib else '>='} "
          f"limit {args.limit_mib:.0f} MiB{why}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
