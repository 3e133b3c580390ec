"""Benchmark: the GPU path on one GPU, offline -- a random reward model shaped like Llama-3.2-1B.

    python benchmarks/bench_gpu.py [--pairs 1024] [--batch-tokens 8192 32768 65536] [--layer 8]
    python benchmarks/bench_gpu.py --tiny --device cpu --pairs 16 --batch-tokens 2048   # a smoke test

Needs torch, transformers (with tokenizers), safetensors and safer-audit's own requirements; downloads
nothing and fetches no weights: it builds a randomly initialised ``LlamaForSequenceClassification`` from a
config shaped like Llama-3.2-1B (16 layers, width 2,048, 32 heads, 8 key-value heads, MLP 8,192, vocabulary
128,256, one reward output) and a byte-level BPE tokenizer trained on its own synthetic text, and writes
synthetic HH-style pairs (lengths spread from a few dozen to ~900 words). Then, side by side in one run:
- extraction (safer_audit.model.activations.extract_activations into an empty cache, bfloat16, the reward
  head's score wanted, as a scan of a reward model runs it) at each ``--batch-tokens``: pairs/s, tokens/s
  and peak GPU memory (torch.cuda.max_memory_allocated);
- SAE training (safer_audit.sae.train_sae, 8 x width latents, k 32, batches of 1,024 tokens) on the
  activations just extracted: tokens/s;
- bfloat16 against float32: the hidden state at the read layer of the same texts from both, mean relative
  difference and cosine similarity, and the reward scores' Spearman correlation.
Prints Markdown tables for BENCHMARKS.md. Meant to finish within ten minutes on one H100 (80 GB); exits with
status 2 and a message when the device asked for is not there.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

# Llama-3.2-1B's shape (its config.json), with a reward head instead of the language-model head
LLAMA_1B = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
            "num_key_value_heads": 8, "vocab_size": 128_256, "max_position_embeddings": 4096, "rope_theta": 500_000.0,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": True}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 1024, "max_position_embeddings": 4096}
WORDS = ("the a to of and is in that it for you on with as are be this was have not but what can if they at or "
         "how do i my your we will would should could about people make help please sorry cannot weapon safe "
         "drug steal kill hurt recipe cook travel code python money bank law doctor child school answer question "
         "because really think know want need good bad right wrong never always maybe here there time day").split()


def synthetic_pairs(n: int, seed: int) -> list[dict]:
    """HH-style pairs: one or two human/assistant turns, response lengths spread over ~10-900 words."""
    rng = random.Random(seed)

    def text(words: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."

    pairs = []
    for _ in range(n):
        turns = "".join(f"\n\nHuman: {text(rng.randint(5, 40))}\n\nAssistant: {text(rng.randint(5, 60))}"
                        for _ in range(rng.randint(0, 1)))
        prompt = f"{turns}\n\nHuman: {text(rng.randint(5, 60))}\n\nAssistant:"
        length = lambda: int(min(900, 10 + rng.expovariate(1 / 150)))  # noqa: E731
        pairs.append({"chosen": f"{prompt} {text(length())}", "rejected": f"{prompt} {text(length())}"})
    return pairs


def build_model(directory: Path, shape: dict, corpus: list[str], device: str) -> Path:
    """A random LlamaForSequenceClassification of ``shape`` (bfloat16 safetensors) and a BPE tokenizer."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(1000, shape["vocab_size"]), special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(directory)
    torch.manual_seed(0)
    config = LlamaConfig(**shape, num_labels=1, pad_token_id=fast.pad_token_id, bos_token_id=fast.bos_token_id,
                         eos_token_id=fast.eos_token_id)
    with torch.device(device):  # initialised where it runs: a 1.2B-parameter init on CPU takes minutes
        model = LlamaForSequenceClassification(config)
    model.to(torch.bfloat16).save_pretrained(directory, safe_serialization=True)
    del model
    return directory


def spearman(a, b) -> float:

    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-12))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=1024, help="synthetic pairs extracted at each batch size")
    parser.add_argument("--batch-tokens", type=int, nargs="+", default=[8192, 32768, 65536])
    parser.add_argument("--layer", type=int, default=8, help="the block read (1-based)")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--sae-tokens", type=int, default=2_000_000, help="at most this many tokens train the SAE")
    parser.add_argument("--agreement-pairs", type=int, default=64)
    parser.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke test, with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer width-64 model instead of the 1B shape")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    on_gpu = args.device.startswith("cuda")
    if on_gpu and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here (torch.cuda.is_available() is False; torch "
              f"{torch.__version__}, CUDA build {torch.version.cuda}). Run it on a machine with an NVIDIA GPU "
              "and a CUDA build of torch, or with --tiny --device cpu as a smoke test.", file=sys.stderr)
        return 2

    from safer_audit.config import ActivationConfig, SaeTrainConfig
    from safer_audit.data import load_pairs
    from safer_audit.model.activations import extract_activations, load_backend
    from safer_audit.model.texts import pair_texts
    from safer_audit.sae import train_sae

    def synchronize():
        if on_gpu:
            torch.cuda.synchronize()

    def peak_gib() -> float:
        return torch.cuda.max_memory_allocated() / 2**30 if on_gpu else float("nan")

    started = time.perf_counter()
    shape = TINY if args.tiny else LLAMA_1B
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        records = synthetic_pairs(args.pairs, args.seed)
        data = tmp / "pairs.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        model_dir = build_model(tmp / "model", shape, [r["chosen"] for r in records[:200]], args.device)
        built = time.perf_counter() - started
        pairs = load_pairs(str(data)).pairs

        rows, store = [], None
        for batch_tokens in args.batch_tokens:
            config = ActivationConfig(model=str(model_dir), layer=args.layer, max_length=args.max_length,
                                      device=args.device, dtype="bfloat16", batch_tokens=batch_tokens,
                                      cache_dir=tmp / f"cache-{batch_tokens}")
            backend = load_backend(config)
            texts = pair_texts(pairs, backend)
            if on_gpu:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            synchronize()
            start = time.perf_counter()
            store = extract_activations(texts, backend, config)
            synchronize()
            seconds = time.perf_counter() - start
            n_tokens = sum(len(ids) for ids in backend.tokenize([t.text for t in texts], max_length=args.max_length,
                                                                has_special_tokens=False)[0])
            rows.append((batch_tokens, seconds, len(pairs) / seconds, n_tokens / seconds, peak_gib()))
            print(f"batch tokens {batch_tokens}: {seconds:.1f} s", file=sys.stderr, flush=True)

        # SAE training on the activations of the last extraction, on the device
        sae_cfg = SaeTrainConfig(k=32, seed=args.seed)
        limit = args.sae_tokens

        def batches():
            left = limit
            for chunk in store.iter_acts():
                if left <= 0:
                    return
                chunk = chunk[:left]
                left -= len(chunk)
                for start in range(0, len(chunk), sae_cfg.batch_size):
                    yield chunk[start:start + sae_cfg.batch_size].to(args.device, non_blocking=True)

        n_sae = min(limit, store.n_tokens())
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        synchronize()
        start = time.perf_counter()
        sae, stats = train_sae(batches, backend.d_model, sae_cfg, n_tokens=n_sae)
        synchronize()
        sae_seconds, sae_peak = time.perf_counter() - start, peak_gib()

        # bfloat16 against float32 on the same texts and weights
        sample = pairs.head(args.agreement_pairs)
        hidden, scores = {}, {}
        for dtype in ("float32", "bfloat16"):
            config = ActivationConfig(model=str(model_dir), layer=args.layer, max_length=args.max_length,
                                      device=args.device, dtype=dtype, cache_dir=tmp / f"agree-{dtype}")
            backend = load_backend(config)
            ids = backend.tokenize([t.text for t in pair_texts(sample, backend)], max_length=args.max_length,
                                   has_special_tokens=False)[0]
            states, rewards = [], []
            for i in range(0, len(ids), 8):
                input_ids, mask = backend.pad_batch(ids[i:i + 8])
                h, score = backend.forward(input_ids, mask, layer=args.layer, want_score=True)
                states.append(h[mask.bool()].cpu())
                rewards.append(score.cpu())
            hidden[dtype], scores[dtype] = torch.cat(states), torch.cat(rewards)
            del backend
        reference, bf16 = hidden["float32"], hidden["bfloat16"]
        relative = float(((bf16 - reference).norm(dim=-1) / reference.norm(dim=-1).clamp_min(1e-6)).mean())
        cosine = float(torch.nn.functional.cosine_similarity(bf16, reference, dim=-1).mean())
        reward_rank = spearman(scores["bfloat16"], scores["float32"])

    device = torch.cuda.get_device_name() if on_gpu else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\n{device}; torch {torch.__version__}; model {'tiny' if args.tiny else 'Llama-3.2-1B-shaped'} "
          f"(width {shape['hidden_size']}, {shape['num_hidden_layers']} layers), layer {args.layer}, "
          f"max length {args.max_length}; {len(pairs)} synthetic pairs; model built in {built:.0f} s\n")
    print("| batch tokens | seconds | pairs/s | tokens/s | peak GPU GiB |")
    print("|---:|---:|---:|---:|---:|")
    for batch_tokens, seconds, pairs_s, tokens_s, peak in rows:
        print(f"| {batch_tokens:,} | {seconds:.2f} | {pairs_s:,.1f} | {tokens_s:,.0f} | {peak:.2f} |")
    print(f"\nSAE training: {n_sae:,} tokens, {sae.cfg.n_latents:,} latents, k {sae_cfg.k}: {sae_seconds:.2f} s, "
          f"{n_sae / sae_seconds:,.0f} tokens/s, FVU {stats.fvu:.3f}, peak GPU {sae_peak:.2f} GiB")
    print(f"bfloat16 vs float32 at layer {args.layer} ({len(reference):,} positions of {len(sample)} pairs): "
          f"mean relative difference {relative:.4f}, cosine {cosine:.5f}; reward Spearman {reward_rank:.4f}")
    print(f"total {time.perf_counter() - started:.0f} s\n\ncommand: python {' '.join(sys.argv)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
