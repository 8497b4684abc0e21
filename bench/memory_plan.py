"""Analytic per-GPU memory plan of a pretraining recipe (an estimate, not a measurement).

    python bench/memory_plan.py [--config megatron_patch/recipes/stage1.yaml] [--vocab 33029]
                                [--gpus 8] [--gpu-gib 80]

Counts what megatron_patch.train allocates for the recipe: bf16 parameters, fp32 gradient
buffers (grad_reduce_in_fp32), the distributed optimizer's fp32 master weights + Adam moments
(sharded over DP), activations under the recipe's recompute setting with flash attention
(Korthikanti et al. 2022, per-layer s*b*h*(10 + 24/t) bytes without sequence parallelism), and the
vocab-parallel logits + fp32 cross-entropy buffers. The parameter count is exact (tests check it
against a built model); the rest is the standard first-order estimate, before allocator
fragmentation and the CUDA/NCCL context (a few GiB; see the margin line).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from solo.hf.image_processing_solo import PATCH_DIM  # noqa: E402

GIB = 1024**3


def parameter_count(model, vocab_padded: int, patch_dim: int = PATCH_DIM) -> dict:
    """Exact parameter counts of SoloGPTModel (TP=1 view) by component."""
    h, f, heads, groups = model.hidden_size, model.ffn_hidden_size, model.num_attention_heads, model.num_query_groups
    d = h // heads
    per_layer = (
        h * (heads + 2 * groups) * d  # fused QKV
        + heads * d * h  # output projection
        + 2 * f * h + f * h  # SwiGLU fc1 = [gate; up], fc2
        + 2 * h  # two RMSNorm weights
    )
    counts = {
        "embedding": vocab_padded * h,
        "output_layer": vocab_padded * h,
        "patch_projection": patch_dim * h,
        "layers": model.num_layers * per_layer,
        "final_norm": h,
    }
    counts["total"] = sum(counts.values())
    return counts


def memory_plan(cfg, vocab_size: int, num_gpus: int) -> dict:
    from megatron_patch.model.model import padded_vocab_size

    m, p, d, t = cfg.model, cfg.parallel, cfg.data, cfg.training
    tp, pp, cp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size
    dp = num_gpus // (tp * pp * cp)
    vocab = padded_vocab_size(vocab_size, m.make_vocab_size_divisible_by, tp)
    params = parameter_count(m, vocab)
    n_rank = params["total"] / (tp * pp)  # the first stage also holds the embedding; uniform estimate
    param_bytes = 2 if t.bf16 else 4
    s, b, h, L = d.seq_length // cp, d.micro_batch_size, m.hidden_size, m.num_layers // pp
    sbh = s * b * h
    layer_full = sbh * (10 + 24 / tp)  # bytes, flash attention, no sequence parallel
    if t.recompute == "full":
        activations = L * sbh * 2 + layer_full  # one bf16 layer input kept per layer + one live layer
    elif t.recompute == "selective":
        activations = L * layer_full
    else:
        activations = L * layer_full
    logits = s * b * vocab / tp * (2 + 4 + 4)  # bf16 logits, fp32 softmax copy, fp32 grad
    plan = {
        "dp": dp,
        "vocab_padded": vocab,
        "parameters": params,
        "weights_gib": n_rank * param_bytes / GIB,
        "grad_buffers_gib": n_rank * 4 / GIB,
        "optimizer_gib": n_rank * 12 / (dp if cfg.optimizer.use_distributed_optimizer else 1) / GIB,
        "activations_gib": activations / GIB,
        "logits_gib": logits / GIB,
    }
    plan["total_gib"] = sum(v for k, v in plan.items() if k.endswith("_gib"))
    return plan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    repo = Path(__file__).resolve().parents[1]
    ap.add_argument("--config", default=str(repo / "megatron_patch" / "recipes" / "stage1.yaml"))
    ap.add_argument("--vocab", type=int, default=33029, help="tokenizer size (SOLO: 33,029)")
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--gpu-gib", type=float, default=80.0)
    ap.add_argument("overrides", nargs="*", help="section.key=value recipe overrides")
    args = ap.parse_args()
    for var in ("SOLO_DATA", "SOLO_RUNS", "SOLO_INIT"):  # paths are irrelevant to the plan
        os.environ.setdefault(var, "/unused")
    from megatron_patch.config import load_config

    cfg = load_config(args.config, args.overrides)
    plan = memory_plan(cfg, args.vocab, args.gpus)
    p = cfg.parallel
    print(f"{Path(args.config).name}: {plan['parameters']['total'] / 1e9:.3f}B parameters "
          f"(vocab padded to {plan['vocab_padded']}); TP={p.tensor_model_parallel_size} "
          f"PP={p.pipeline_model_parallel_size} DP={plan['dp']} on {args.gpus} GPUs; "
          f"seq {cfg.data.seq_length}, micro-batch {cfg.data.micro_batch_size}, recompute {cfg.training.recompute}")
    for key in ("weights_gib", "grad_buffers_gib", "optimizer_gib", "activations_gib", "logits_gib", "total_gib"):
        print(f"  {key[:-4]:<14} {plan[key]:7.1f} GiB")
    print(f"  margin         {args.gpu_gib - plan['total_gib']:7.1f} GiB of {args.gpu_gib:.0f} "
          "(CUDA context, NCCL buffers, fragmentation)")


if __name__ == "__main__":
    main()
