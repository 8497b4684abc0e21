"""Packed SFT vs one sample per step (SOLO's way), useful tokens per second, in one run.

Both arms train the same randomly initialised Mistral-shaped `SoloForCausalLM` (fwd + bwd + AdamW
step) on the same SFT-like mix of sample lengths (uniform 300–3,000 tokens by default):

* packed: samples packed to --seq-length rows by data preparation's best-fit-decreasing packer,
  per-document attention (position ids restarting per sample, the model's own block-diagonal mask);
* one sample per step: each sample alone, batch 1, no padding (SOLO's SFT loop: batch 1 x 64 accumulation).

Useful tokens are the samples' own tokens (never padding). Prints tokens/s of each arm and the
ratio; on CPU the arms cost about the same per token (a CPU is saturated by one short sequence),
the gain of packing is a GPU effect (a batch-1 short sequence leaves most of a GPU idle).

    python bench/bench_sft.py [--device cuda] [--samples 24] [--seq-length 4096]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from data_prep.packing import BestFitPacker
from solo.hf import SoloConfig, SoloForCausalLM
from solo.sft.data import collate_packs


def sample_lengths(count: int, low: int, high: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, high, size=count).astype(np.int64)


def make_sample(rng, length: int) -> dict[str, np.ndarray]:
    loss = np.zeros(length, np.uint8)
    loss[length // 2:] = 1  # the second half plays the assistant's answer
    return {"tokens": rng.integers(3, 30000, size=length).astype(np.int32), "loss_mask": loss,
            "cu_seqlens": np.array([0, length], np.int32), "patches": np.zeros((0, 3072), np.uint8),
            "vision_patch_indices": np.full(length, -1, np.int64)}


def concat(samples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    lengths = [len(s["tokens"]) for s in samples]
    return {"tokens": np.concatenate([s["tokens"] for s in samples]),
            "loss_mask": np.concatenate([s["loss_mask"] for s in samples]),
            "cu_seqlens": np.cumsum([0] + lengths).astype(np.int32), "patches": np.zeros((0, 3072), np.uint8),
            "vision_patch_indices": np.full(sum(lengths), -1, np.int64)}


def train_rows(model, optimizer, rows: list[dict[str, np.ndarray]], device: str, dtype, steps: int) -> float:
    """Seconds to run fwd + bwd over each row (batch 1) with `steps` optimizer steps spread evenly."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    every = -(-len(rows) // steps)
    for index, row in enumerate(rows, start=1):
        batch = {k: v.to(device) for k, v in collate_packs([row], pad_id=0).items()}
        with torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(**batch).loss
        loss.backward()
        if index % every == 0 or index == len(rows):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    sync()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=24)
    parser.add_argument("--seq-length", type=int, default=4096)
    parser.add_argument("--min-length", type=int, default=300)
    parser.add_argument("--max-length", type=int, default=3000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    torch.manual_seed(args.seed)
    config = SoloConfig(vocab_size=33029, hidden_size=args.hidden, intermediate_size=args.hidden * 7 // 2,
                        num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                        num_key_value_heads=max(1, args.hidden // 256), max_position_embeddings=args.seq_length,
                        sliding_window=args.seq_length, use_cache=False)
    config._attn_implementation = "sdpa"
    model = SoloForCausalLM(config).to(args.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    rng = np.random.default_rng(args.seed)
    samples = [make_sample(rng, int(n)) for n in sample_lengths(args.samples, args.min_length, args.max_length,
                                                                args.seed)]
    packer = BestFitPacker(args.seq_length)
    packs = []
    for index, sample in enumerate(samples):
        packs += packer.add(len(sample["tokens"]), index)
    packs += packer.flush()
    rows = [concat([samples[index] for _, _, index in pack.items]) for pack in packs]
    useful = sum(len(s["tokens"]) for s in samples)
    fill = useful / (len(rows) * args.seq_length)

    # Both arms take the same number of optimizer steps (SOLO accumulated 64 samples per step).
    train_rows(model, optimizer, rows[:1], args.device, dtype, 1)  # warm-up (allocator, kernels)
    packed_s = train_rows(model, optimizer, rows, args.device, dtype, len(rows))
    single_s = train_rows(model, optimizer, samples, args.device, dtype, len(rows))
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"model {params:.1f}M params, {args.device}, {dtype}; {args.samples} samples of "
          f"{args.min_length}-{args.max_length} tokens ({useful:,} useful tokens)")
    print(f"packed to {args.seq_length}: {len(rows)} rows, fill {fill:.2%}: {useful / packed_s:,.0f} useful tokens/s")
    print(f"one sample per step (SOLO): {len(samples)} steps: {useful / single_s:,.0f} useful tokens/s")
    print(f"packed / one-sample: {single_s / packed_s:.2f}x")


if __name__ == "__main__":
    main()
