"""A transformers causal LM on flash_cuda: a tiny random Llama with GQA (4 query heads over 2 kv
heads), trained a few steps on padded batches with attn_implementation="flash_cuda" and then used
for greedy generate() on a left-padded batch, beside the same model on transformers' sdpa
implementation: the same initial weights and batches, printing the loss difference, whether the
generated tokens agree, and the times.

    python examples/hf_llama.py [--steps 40] [--device cpu|cuda] [--quick]
"""
import argparse
import copy
import time

import torch
import transformers

import flash_cuda
import flash_cuda.integrations.transformers  # noqa: F401  (registers attn_implementation="flash_cuda")


def padded_batches(steps, B, N, vocab, seed=0):
    """Counting sequences (t, t+1, ...) of random lengths, right-padded with token 0."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        start = torch.randint(1, vocab // 2, (B, 1), generator=g)
        ids = (start + torch.arange(N)) % (vocab - 1) + 1
        lengths = torch.randint(N // 2, N + 1, (B,), generator=g)
        mask = (torch.arange(N)[None, :] < lengths[:, None]).long()
        yield ids * mask, mask


def run(model, steps, B, N, vocab, device):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses, t0 = [], time.perf_counter()
    for ids, mask in padded_batches(steps, B, N, vocab):
        ids, mask = ids.to(device), mask.to(device)
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    train_s = time.perf_counter() - t0
    model.eval()
    prompts = torch.tensor([[0, 0, 0, 5, 6, 7], [0, 20, 21, 22, 23, 24], [40, 41, 42, 43, 44, 45]], device=device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(prompts, attention_mask=(prompts != 0).long(), max_new_tokens=12, do_sample=False,
                             pad_token_id=0)
    return losses, out[:, prompts.shape[1]:], train_s, time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: 40, 10 with --quick)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() and flash_cuda.has_cuda_kernels() else "cpu")
    ap.add_argument("--quick", action="store_true", help="10 steps (a smoke run)")
    args = ap.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        ap.error(f"--steps must be at least 1, got {args.steps}")
    steps = args.steps if args.steps is not None else (10 if args.quick else 40)
    vocab, B, N = 64, 8, 32
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg)
    results = {}
    for impl in ("flash_cuda", "sdpa"):
        model = copy.deepcopy(base).to(args.device)
        model.set_attn_implementation(impl)
        results[impl] = run(model, steps, B, N, vocab, args.device)
    (l_fc, g_fc, tt_fc, tg_fc), (l_sd, g_sd, tt_sd, tg_sd) = results["flash_cuda"], results["sdpa"]
    print(f"device {args.device}: {steps} training steps on padded batches of {B} x {N}")
    print(f"loss: first {l_fc[0]:.4f} (sdpa {l_sd[0]:.4f}), last {l_fc[-1]:.4f} (sdpa {l_sd[-1]:.4f}), "
          f"max |difference| {max(abs(a - b) for a, b in zip(l_fc, l_sd)):.2e}")
    print(f"greedy tokens of the left-padded prompts identical to sdpa's: {torch.equal(g_fc, g_sd)}")
    print(f"generated (flash_cuda): {g_fc.tolist()}")
    print(f"time: training {tt_fc:.2f} s (sdpa {tt_sd:.2f} s), generate {tg_fc:.2f} s (sdpa {tg_sd:.2f} s)")
    return results


if __name__ == "__main__":
    main()
