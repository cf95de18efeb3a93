"""A minimal GPT trained with flash_cuda.attention under torch.compile, beside the same model on
torch SDPA: both from the same initial weights on the same batches (a synthetic character-level
task: continue a repeating pattern), printing losses, the difference between the two runs and their
step times, and saving the loss curves to a plot.

    python examples/gpt_train.py [--steps 200] [--device cpu|cuda] [--no-compile] [--plot PATH] [--quick]
"""
import argparse
import copy
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import flash_cuda


class Block(nn.Module):
    def __init__(self, d, heads, kv_heads, attn):
        super().__init__()
        self.heads, self.kv_heads, self.attn = heads, kv_heads, attn
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q = nn.Linear(d, d, bias=False)
        self.kv = nn.Linear(d, 2 * d // heads * kv_heads, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        B, N, d = x.shape
        h = self.ln1(x)
        q = self.q(h).view(B, N, self.heads, -1).transpose(1, 2)              # (B, H, N, D)
        k, v = self.kv(h).view(B, N, 2, self.kv_heads, -1).permute(2, 0, 3, 1, 4)  # (B, Hkv, N, D) each
        if self.attn == "flash_cuda":
            a = flash_cuda.attention(q, k, v, causal=True)                      # GQA as it is
        else:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, N, d))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab, n, d, layers, heads, kv_heads, attn):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(n, d)
        self.blocks = nn.ModuleList(Block(d, heads, kv_heads, attn) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln(x))


def batches(steps, B, N, vocab, device, seed=0):
    """Sequences that repeat a random pattern of period 3..9: predictable from the context only."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        period = torch.randint(3, 10, (B,), generator=g)
        pattern = torch.randint(0, vocab, (B, 9), generator=g)
        idx = torch.arange(N + 1)[None, :] % period[:, None]
        yield torch.gather(pattern, 1, idx).to(device)


def train(model, steps, B, N, vocab, device, compile_):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    step_fn = torch.compile(model) if compile_ else model
    losses, times = [], []
    for seq in batches(steps, B, N, vocab, device):
        t0 = time.perf_counter()
        logits = step_fn(seq[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, vocab).float(), seq[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    return losses, times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: 200, 30 with --quick)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() and flash_cuda.has_cuda_kernels() else "cpu")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--plot", default="gpt_train_loss.png")
    ap.add_argument("--quick", action="store_true", help="30 steps of a smaller model (a smoke run)")
    args = ap.parse_args(argv)
    steps, (B, N, d, layers) = (30, (8, 64, 64, 2)) if args.quick else (200, (16, 256, 128, 4))
    if args.steps is not None and args.steps < 1:
        ap.error(f"--steps must be at least 1, got {args.steps}")
    steps = steps if args.steps is None else args.steps
    vocab, dtype = 32, torch.bfloat16 if args.device == "cuda" else torch.float32
    torch.manual_seed(0)
    base = GPT(vocab, N, d, layers, 4, 2, "flash_cuda").to(args.device, dtype)
    runs = {}
    for attn in ("flash_cuda", "sdpa"):
        model = copy.deepcopy(base)
        for b in model.blocks:
            b.attn = attn
        runs[attn] = train(model, steps, B, N, vocab, args.device, not args.no_compile)
    (l_fc, t_fc), (l_sd, t_sd) = runs["flash_cuda"], runs["sdpa"]
    skip = min(3, steps - 1)  # compilation and warm-up steps
    per_step = lambda t: sorted(t[skip:])[len(t[skip:]) // 2] * 1e3  # noqa: E731
    print(f"device {args.device}, dtype {dtype}, {steps} steps of B={B} N={N}, compile={not args.no_compile}")
    print(f"loss: first {l_fc[0]:.4f} (sdpa {l_sd[0]:.4f}), last {l_fc[-1]:.4f} (sdpa {l_sd[-1]:.4f})")
    print(f"max |loss difference| over the run: {max(abs(a - b) for a, b in zip(l_fc, l_sd)):.2e}")
    print(f"median step: flash_cuda {per_step(t_fc):.1f} ms, sdpa {per_step(t_sd):.1f} ms")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        plt.figure(figsize=(6, 4))
        plt.plot(l_fc, label="flash_cuda")
        plt.plot(l_sd, "--", label="torch SDPA")
        plt.xlabel("step"), plt.ylabel("loss"), plt.yscale("log"), plt.legend(), plt.tight_layout()
        plt.savefig(args.plot)
        print(f"loss curves: {args.plot}")
    except ImportError:
        print("matplotlib not installed: no plot")
    return {"flash_cuda": l_fc, "sdpa": l_sd}


if __name__ == "__main__":
    main()
