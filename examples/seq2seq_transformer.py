"""The Transformer of "Attention Is All You Need" on flash_cuda: an encoder whose self-attention
ignores the padding of a batch of sentences, a decoder with causal self-attention and
cross-attention to the encoder's output, trained with teacher forcing on a synthetic translation
task and decoded greedily token by token, beside the same model on torch SDPA.

The task: reverse a sequence of 3 to 12 digit tokens (source and target padded to the longest of
the batch), split into a training stream and a held-out set of 500 sequences.

The model: sinusoidal positions, pre-norm layers (LayerNorm before each sub-layer, as most modern
Transformers do; it trains stably without warm-up tricks), 3 encoder and 3 decoder layers,
d_model 128, 4 heads, FFN 512.

Attention on flash_cuda:
- encoder self-attention: the source's key-padding mask (B, 1, 1, Ns), or packed sequences through
  varlen_attention (--lengths varlen); padded query rows are computed but never used;
- decoder self-attention: causal over the right-padded target (a padded key only follows the real
  queries, so causality alone hides it);
- cross-attention: decoder queries (Nt) against the encoder's keys (Ns != Nt) with the source's
  key-padding mask;
- greedy decoding: the encoder and each layer's cross-attention K/V once per sequence, the decoder's
  self-attention through attention_with_kvcache (the new token's K/V appended in place, one query
  against the cache), never re-running the prefix.
The SDPA twin is the same modules with torch.nn.functional.scaled_dot_product_attention (boolean
masks) and a concatenated cache. Both start from the same weights and see the same batches.

    python examples/seq2seq_transformer.py [--steps 800] [--lengths mask|varlen] [--device cpu|cuda]
                                           [--plot PATH] [--quick]
The last line printed is `exact-match accuracy: <value>` (flash_cuda's, greedy, held-out set).
"""
import argparse
import copy
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import flash_cuda

PAD, BOS, EOS, DIGITS = 0, 1, 2, 10
VOCAB = 3 + DIGITS


def make_batch(B, g, min_len=3, max_len=12):
    """Sources of random digits and their reversals: (src (B, Ns), tgt_in (B, Nt), tgt_out (B, Nt))."""
    lengths = torch.randint(min_len, max_len + 1, (B,), generator=g)
    ns = int(lengths.max())
    src = torch.full((B, ns), PAD)
    tgt_in, tgt_out = torch.full((B, ns + 1), PAD), torch.full((B, ns + 1), PAD)
    for b, n in enumerate(lengths.tolist()):
        s = torch.randint(3, VOCAB, (n,), generator=g)
        src[b, :n] = s
        tgt_in[b, 0], tgt_in[b, 1:n + 1] = BOS, s.flip(0)
        tgt_out[b, :n], tgt_out[b, n] = s.flip(0), EOS
    return src, tgt_in, tgt_out


def sinusoids(n, d, device):
    pos = torch.arange(n, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, d, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / d))
    pe = torch.zeros(n, d, device=device)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
    return pe


class Attention(nn.Module):
    """Multi-head attention; `backend` picks flash_cuda or SDPA, `lengths` the encoder's padding path."""

    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.backend, self.lengths = "flash_cuda", "mask"

    def split(self, x):  # (B, N, d) -> (B, H, N, D)
        return x.view(x.shape[0], x.shape[1], self.heads, -1).transpose(1, 2)

    def attend(self, q, k, v, key_keep=None, causal=False, cu=None):
        """q (B, H, Nq, D), k, v (B, H, Nk, D); key_keep (B, Nk) bool or None -> (B, Nq, d)."""
        if self.backend == "flash_cuda":
            if cu is not None:  # packed: (B, H, N, D) rows of real tokens -> varlen -> back
                keep, (cu_seqlens, max_len) = key_keep, cu
                pack = lambda x: x.transpose(1, 2)[keep]  # noqa: E731  (total, H, D)
                out_p = flash_cuda.varlen_attention(pack(q), pack(k), pack(v), cu_seqlens, cu_seqlens, max_len, max_len)
                out = q.new_zeros(q.shape[0], q.shape[2], q.shape[1], q.shape[3])
                out[keep] = out_p
                return out.flatten(2)
            mask = None if key_keep is None else key_keep[:, None, None, :]
            out = flash_cuda.attention(q, k, v, causal=causal, attn_mask=mask)
        else:
            mask = None if key_keep is None else key_keep[:, None, None, :]
            if causal:
                tri = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril(k.shape[2] - q.shape[2])
                mask = tri if mask is None else mask & tri
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.transpose(1, 2).flatten(2)

    def forward(self, x, mem=None, key_keep=None, causal=False, cu=None):
        src = x if mem is None else mem
        return self.o(self.attend(self.split(self.q(x)), self.split(self.k(src)), self.split(self.v(src)),
                                  key_keep, causal, cu))


class EncoderLayer(nn.Module):
    def __init__(self, d, heads, ff):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, heads)
        self.ff = nn.Sequential(nn.Linear(d, ff), nn.ReLU(), nn.Linear(ff, d))

    def forward(self, x, keep, cu):
        x = x + self.attn(self.ln1(x), key_keep=keep, cu=cu)
        return x + self.ff(self.ln2(x))


class DecoderLayer(nn.Module):
    def __init__(self, d, heads, ff):
        super().__init__()
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.self_attn, self.cross = Attention(d, heads), Attention(d, heads)
        self.ff = nn.Sequential(nn.Linear(d, ff), nn.ReLU(), nn.Linear(ff, d))

    def forward(self, y, mem, src_keep):
        y = y + self.self_attn(self.ln1(y), causal=True)
        y = y + self.cross(self.ln2(y), mem=mem, key_keep=src_keep)
        return y + self.ff(self.ln3(y))


class Seq2Seq(nn.Module):
    def __init__(self, d=128, heads=4, layers=3, ff=512, max_len=64):
        super().__init__()
        self.d = d
        self.emb = nn.Embedding(VOCAB, d)
        nn.init.normal_(self.emb.weight, std=d ** -0.5)  # x sqrt(d) in embed(): unit scale, as the positions
        self.register_buffer("pe", sinusoids(max_len, d, "cpu"), persistent=False)
        self.enc = nn.ModuleList(EncoderLayer(d, heads, ff) for _ in range(layers))
        self.dec = nn.ModuleList(DecoderLayer(d, heads, ff) for _ in range(layers))
        self.ln_enc, self.ln_dec = nn.LayerNorm(d), nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB)

    def set_backend(self, backend, lengths="mask"):
        for m in self.modules():
            if isinstance(m, Attention):
                m.backend, m.lengths = backend, lengths
        return self

    def embed(self, tok, start=0):
        return self.emb(tok) * math.sqrt(self.d) + self.pe[start:start + tok.shape[1]]

    def encode(self, src):
        keep = src != PAD
        cu = None
        if self.enc[0].attn.backend == "flash_cuda" and self.enc[0].attn.lengths == "varlen":
            lens = keep.sum(1, dtype=torch.int32)
            cu = (F.pad(lens.cumsum(0, dtype=torch.int32), (1, 0)), int(src.shape[1]))
        x = self.embed(src)
        for layer in self.enc:
            x = layer(x, keep, cu)
        return self.ln_enc(x), keep

    def forward(self, src, tgt_in):
        mem, keep = self.encode(src)
        y = self.embed(tgt_in)
        for layer in self.dec:
            y = layer(y, mem, keep)
        return self.head(self.ln_dec(y))

    @torch.no_grad()
    def greedy(self, src, max_new):
        """Greedy decoding: cross-attention K/V once per sequence, self-attention through a KV cache."""
        B, dev = src.shape[0], src.device
        mem, keep = self.encode(src)
        cross_kv = [(l.cross.split(l.cross.k(mem)), l.cross.split(l.cross.v(mem))) for l in self.dec]
        heads, dh = self.dec[0].self_attn.heads, self.d // self.dec[0].self_attn.heads
        caches = [None] * len(self.dec)  # allocated at the first step, in the projections' dtype (autocast's)
        seqlens = torch.zeros(B, dtype=torch.int32, device=dev)
        tok = torch.full((B, 1), BOS, device=dev)
        out = []
        for t in range(max_new):
            y = self.embed(tok, start=t)
            for i, (layer, (ck, cv)) in enumerate(zip(self.dec, cross_kv)):
                a = layer.self_attn
                h = layer.ln1(y)
                q, k, v = a.split(a.q(h)), a.split(a.k(h)), a.split(a.v(h))
                if caches[i] is None:
                    caches[i] = tuple(torch.zeros(B, heads, max_new, dh, device=dev, dtype=k.dtype) for _ in range(2))
                kc, vc = caches[i]
                if a.backend == "flash_cuda":
                    att = flash_cuda.attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=seqlens)
                else:  # SDPA has no cache API: write the new K/V, attend to the prefix
                    kc[:, :, t:t + 1], vc[:, :, t:t + 1] = k, v
                    att = F.scaled_dot_product_attention(q, kc[:, :, :t + 1], vc[:, :, :t + 1])
                y = y + a.o(att.transpose(1, 2).flatten(2))
                c = layer.cross
                y = y + c.o(c.attend(c.split(c.q(layer.ln2(y))), ck, cv, key_keep=keep))
                y = y + layer.ff(layer.ln3(y))
            seqlens += 1
            tok = self.head(self.ln_dec(y)).argmax(-1)
            out.append(tok)
        return torch.cat(out, 1)


def exact_match(model, src, tgt_out):
    pred = model.greedy(src, tgt_out.shape[1])
    real = tgt_out != PAD
    return ((pred == tgt_out) | ~real).all(1).float().mean().item()


def train(model, steps, B, device, seed, lr=2e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    # (OneCycleLR divides by pct_start * total_steps - 1: 0 at 10 steps)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                                pct_start=0.1 if steps != 10 else 0.15)
    g = torch.Generator().manual_seed(seed)
    losses, t0 = [], time.perf_counter()
    model.train()
    for _ in range(steps):
        src, tgt_in, tgt_out = (x.to(device) for x in make_batch(B, g))
        logits = model(src, tgt_in)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tgt_out.flatten(), ignore_index=PAD)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    if device == "cuda":
        torch.cuda.synchronize()
    model.eval()
    return losses, time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: 800, 500 with --quick)")
    ap.add_argument("--lengths", choices=("mask", "varlen"), default="mask",
                    help="the encoder's variable lengths: key-padding mask or packed varlen_attention")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() and flash_cuda.has_cuda_kernels() else "cpu")
    ap.add_argument("--plot", default="seq2seq_loss.png")
    ap.add_argument("--quick", action="store_true", help="fewer steps, smaller model (CI); still reaches 99%%")
    args = ap.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        ap.error(f"--steps must be at least 1, got {args.steps}")
    steps, B, size = (800, 64, dict(d=128, layers=3, ff=512))
    if args.quick:
        steps, B, size = 500, 32, dict(d=64, layers=2, ff=256)
    steps = steps if args.steps is None else args.steps
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    torch.manual_seed(0)
    base = Seq2Seq(**size).to(args.device)
    held = [x.to(args.device) for x in make_batch(500, torch.Generator().manual_seed(12345))]
    results = {}
    for backend in ("flash_cuda", "sdpa"):
        model = copy.deepcopy(base).set_backend(backend, args.lengths)
        with torch.autocast(args.device, dtype=dtype, enabled=dtype != torch.float32):
            losses, secs = train(model, steps, B, args.device, seed=1)
            t0 = time.perf_counter()
            acc = exact_match(model, held[0], held[2])
            dec_s = time.perf_counter() - t0
        results[backend] = dict(losses=losses, train_s=secs, decode_s=dec_s, accuracy=acc)
    fc, sd = results["flash_cuda"], results["sdpa"]
    first = min(50, steps)
    print(f"device {args.device}, {steps} steps of {B} sequences, model {size}, encoder lengths: {args.lengths}")
    print(f"loss: first {fc['losses'][0]:.4f} (sdpa {sd['losses'][0]:.4f}), last {fc['losses'][-1]:.4f} "
          f"(sdpa {sd['losses'][-1]:.4f})")
    print(f"max |loss difference| over the first {first} steps: "
          f"{max(abs(a - b) for a, b in zip(fc['losses'][:first], sd['losses'][:first])):.2e}; over the run: "
          f"{max(abs(a - b) for a, b in zip(fc['losses'], sd['losses'])):.2e}")
    print(f"time: training {fc['train_s']:.1f} s (sdpa {sd['train_s']:.1f} s), greedy decoding of 500 held-out "
          f"sequences {fc['decode_s']:.2f} s (sdpa {sd['decode_s']:.2f} s)")
    print(f"sdpa exact-match accuracy: {sd['accuracy']:.4f}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        plt.figure(figsize=(6, 4))
        plt.plot(fc["losses"], label="flash_cuda")
        plt.plot(sd["losses"], "--", label="torch SDPA")
        plt.xlabel("step"), plt.ylabel("loss"), plt.yscale("log"), plt.legend(), plt.tight_layout()
        plt.savefig(args.plot)
        print(f"loss curves: {args.plot}")
    except ImportError:
        print("matplotlib not installed: no plot")
    print(f"exact-match accuracy: {fc['accuracy']:.4f}")
    return results


if __name__ == "__main__":
    main()
