"""Peak memory of one CPU attention call: flash_cuda beside torch SDPA, forward and forward+backward.

How it measures
    Each call runs in a fresh child process (this script with --child): it imports torch and
    flash_cuda, allocates q, k, v (and the output gradient), resets the kernel's record of its peak
    resident set size (writing 5 to /proc/self/clear_refs: VmHWM becomes VmRSS), runs the call
    (out = attention(q, k, v); out.backward(grad) for fwd+bwd) and reads VmHWM from
    /proc/self/status. The figure is VmHWM minus the RSS just before the call: what the call
    itself made resident, outputs and gradients included. flash_cuda.attention and
    torch.nn.functional.scaled_dot_product_attention (the CPU flash kernel for these inputs) see
    the same inputs in children of the same run.

Run (about a minute at the default shape on 2 cores):
    python benchmarks/memory_cpu.py
    python benchmarks/memory_cpu.py --n 16384 --dtypes float32 --json /tmp/memory_cpu.json
"""
import argparse
import json
import os
import subprocess
import sys

MIB = 2 ** 20
SIDES = ("flash_cuda", "sdpa")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--b", type=int, default=1, help="batch (default: %(default)s)")
    p.add_argument("--h", type=int, default=8, help="heads (default: %(default)s)")
    p.add_argument("--n", type=int, default=8192, help="sequence length (default: %(default)s)")
    p.add_argument("--d", type=int, default=128, help="head dim (default: %(default)s)")
    p.add_argument("--causal", action="store_true", help="causal attention (default: non-causal)")
    p.add_argument("--dtypes", default="float16,bfloat16,float32", help="comma-separated (default: %(default)s)")
    p.add_argument("--modes", default="fwd,fwd+bwd", help="comma-separated: fwd, fwd+bwd (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="torch threads of the children (default: torch's)")
    p.add_argument("--json", metavar="PATH", help="also save the rows as JSON to PATH")
    p.add_argument("--child", nargs=3, metavar=("SIDE", "DTYPE", "MODE"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(args):
    import torch

    import flash_cuda

    side, dtype, mode = args.child
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    shape = (args.b, args.h, args.n, args.d)
    q, k, v = (torch.randn(shape, dtype=dt, requires_grad=mode == "fwd+bwd") for _ in range(3))
    grad = torch.randn(shape, dtype=dt)
    fn = flash_cuda.attention if side == "flash_cuda" else torch.nn.functional.scaled_dot_product_attention
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = status_kib("VmRSS")
    out = fn(q, k, v, is_causal=args.causal) if side == "sdpa" else fn(q, k, v, causal=args.causal)
    if mode == "fwd+bwd":
        out.backward(grad)
    peak = status_kib("VmHWM")
    print(json.dumps({"call_mib": (peak - before) / 1024, "threads": torch.get_num_threads()}), flush=True)
    os._exit(0)  # (no interpreter teardown)


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        child(args)
        return 0
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_sdpa as bs  # (the CPU's name and ISA flags, as every benchmark prints them)

    cpu = {"name": bs.device_name("cpu"), "isa": bs.cpu_isa()}
    rows = []
    print(f"CPU: {cpu['name']} ({' '.join(cpu['isa'])}); B={args.b} H={args.h} N={args.n} D={args.d} "
          f"{'causal' if args.causal else 'non-causal'}; peak memory a call made resident (MiB)")
    print(f"| dtype | mode | flash_cuda | SDPA | flash_cuda / SDPA |\n|---|---|---|---|---|")
    for dtype in args.dtypes.split(","):
        for mode in args.modes.split(","):
            row = {"dtype": dtype, "mode": mode, "B": args.b, "H": args.h, "N": args.n, "D": args.d,
                   "causal": args.causal}
            for side in SIDES:
                cmd = [sys.executable, __file__, "--child", side, dtype, mode, "--b", str(args.b), "--h", str(args.h),
                       "--n", str(args.n), "--d", str(args.d), "--threads", str(args.threads)]
                if args.causal:
                    cmd.append("--causal")
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    sys.exit(f"{side} {dtype} {mode} child failed:\n{proc.stderr[-3000:]}")
                rep = json.loads(proc.stdout.strip().splitlines()[-1])
                row[side + "_mib"], row["threads"] = rep["call_mib"], rep["threads"]
            rows.append(row)
            print(f"| {dtype} | {mode} | {row['flash_cuda_mib']:.1f} | {row['sdpa_mib']:.1f} | "
                  f"{row['flash_cuda_mib'] / max(row['sdpa_mib'], 1e-9):.2f} |", flush=True)
    print(f"({rows[0]['threads']} threads)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu, "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
