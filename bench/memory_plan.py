"""Analytic per-GPU memory plan of a pretraining recipe (an estimate, not a measurement).

    python bench/memory_plan.py [--config megatron_patch/recipes/stage1.yaml] [--vocab 33029]
                                [--gpus 8] [--gpu-gib 80] [--compare] [section.key=value ...]

Counts what megatron_patch.train allocates for the recipe: bf16 parameters, fp32 gradient
buffers (grad_reduce_in_fp32), the distributed optimizer's fp32 master weights + Adam moments
(sharded over DP), activations, and the vocab-parallel logits + fp32 cross-entropy buffers.
Activations are the tensors each layer of this architecture (RMSNorm, GQA, SwiGLU, flash-style
attention that keeps no score matrix) saves for backward (:func:`layer_activation_bytes`), with
sequence parallelism sharding the norm inputs over TP, under the recipe's recompute setting:
``full`` + ``uniform`` keeps one layer input per group of ``recompute_num_layers`` layers, ``full``
+ ``block`` recomputes only the first ``recompute_num_layers`` layers of a stage and keeps every
other layer's activations. The parameter count is exact and the per-layer activation bytes are
checked against a built model (tests). Not counted: allocator fragmentation and the CUDA/NCCL
context (a few GiB; see the margin line). ``--compare`` prints the plan of every recompute choice
and marks the fastest that fits with the margin.
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


def layer_activation_bytes(model, seq: int, micro_batch: int, tp: int, sequence_parallel: bool,
                           bytes_per_value: int = 2) -> float:
    """Bytes one transformer layer keeps for backward (per GPU) without recompute.

    Replicated over TP unless sequence-parallel: the two norm inputs and the two norm outputs
    (the QKV / fc1 inputs; with SP the linears keep the sharded input and re-gather it in backward).
    Sharded over TP: Q, K, V; the RoPE-rotated Q and K; the attention output; fc1's output
    (gate and up); the SwiGLU output (fc2's input).
    """
    h, f = model.hidden_size, model.ffn_hidden_size
    kv = model.num_query_groups * (h // model.num_attention_heads)
    tokens = seq * micro_batch
    replicated = 4 * h  # norm inputs and outputs
    sharded = (h + 2 * kv) + (h + kv) + h + 2 * f + f
    per_token = replicated / (tp if sequence_parallel else 1) + sharded / tp
    return tokens * per_token * bytes_per_value


def activation_terms(cfg, tp: int, layers: int, bytes_per_value: int = 2, layer_bytes: float = None) -> tuple:
    """(kept through the forward, rebuilt at a time in backward) activation bytes of one pipeline
    stage of ``layers`` layers under the recipe's recompute setting. ``layer_bytes`` overrides the
    per-layer estimate (tests use a measured one)."""
    m, d, t, p = cfg.model, cfg.data, cfg.training, cfg.parallel
    sp = p.sequence_parallel and tp > 1
    layer = layer_bytes if layer_bytes is not None else layer_activation_bytes(
        m, d.seq_length, d.micro_batch_size, tp, sp, bytes_per_value)
    layer_input = d.seq_length * d.micro_batch_size * m.hidden_size * bytes_per_value / (tp if sp else 1)
    if t.recompute != "full":  # none, or selective (core attention only: nothing to save with flash)
        return layers * layer, 0.0
    n = min(t.recompute_num_layers, layers)
    if t.recompute_method == "uniform":  # every group of n layers keeps only its input
        return -(-layers // n) * layer_input, n * layer
    return n * layer_input + (layers - n) * layer, layer  # block: the first n layers recomputed


def activation_bytes(cfg, tp: int, layers: int, bytes_per_value: int = 2) -> float:
    """Peak activations of one pipeline stage under the recipe's recompute setting."""
    return sum(activation_terms(cfg, tp, layers, bytes_per_value))


def memory_plan(cfg, vocab_size: int, num_gpus: int) -> dict:
    from megatron_patch.config import padded_vocab_size

    m, p, d, t = cfg.model, cfg.parallel, cfg.data, cfg.training
    tp, pp, cp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size
    dp = num_gpus // (tp * pp * cp)
    vocab = padded_vocab_size(vocab_size, m.make_vocab_size_divisible_by, tp)
    params = parameter_count(m, vocab)
    n_rank = params["total"] / (tp * pp)  # the first stage also holds the embedding; uniform estimate
    param_bytes = 2 if t.bf16 else 4
    s, b = d.seq_length // cp, d.micro_batch_size
    logits = s * b * vocab / tp * (2 + 4 + 4)  # bf16 logits, fp32 softmax copy, fp32 grad
    plan = {
        "dp": dp,
        "vocab_padded": vocab,
        "parameters": params,
        "weights_gib": n_rank * param_bytes / GIB,
        "grad_buffers_gib": n_rank * 4 / GIB,
        "optimizer_gib": n_rank * 12 / (dp if cfg.optimizer.use_distributed_optimizer else 1) / GIB,
        "activations_gib": activation_bytes(cfg, tp, m.num_layers // pp, param_bytes) / GIB,
        "logits_gib": logits / GIB,
    }
    plan["total_gib"] = sum(v for k, v in plan.items() if k.endswith("_gib"))
    return plan


def recompute_choices(cfg) -> list[tuple[str, str, int]]:
    """(recompute, method, layers) from fastest to slowest: less recompute is faster."""
    layers = cfg.model.num_layers // cfg.parallel.pipeline_model_parallel_size
    return ([("none", "uniform", 1)] + [("full", "block", n) for n in range(1, layers + 1)]
            + [("full", "uniform", 1)])


def fastest_fitting(cfg, vocab_size: int, num_gpus: int, gpu_gib: float, margin_gib: float):
    """The least-recompute setting whose plan leaves ``margin_gib`` free, and its plan (None if none)."""
    import copy

    for recompute, method, n in recompute_choices(cfg):
        trial = copy.deepcopy(cfg)
        training = trial.training
        training.recompute, training.recompute_method, training.recompute_num_layers = recompute, method, n
        plan = memory_plan(trial, vocab_size, num_gpus)
        if plan["total_gib"] + margin_gib <= gpu_gib:
            return (recompute, method, n), plan
    return None, None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    repo = Path(__file__).resolve().parents[1]
    ap.add_argument("--config", default=str(repo / "megatron_patch" / "recipes" / "stage1.yaml"))
    ap.add_argument("--vocab", type=int, default=33029, help="tokenizer size (SOLO: 33,029)")
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--gpu-gib", type=float, default=80.0)
    ap.add_argument("--margin-gib", type=float, default=12.0,
                    help="kept free for the CUDA/NCCL context, fragmentation and data (default 12)")
    ap.add_argument("--compare", action="store_true", help="also print the fastest recompute setting that fits")
    ap.add_argument("overrides", nargs="*", help="section.key=value recipe overrides")
    args = ap.parse_args()
    for var in ("SOLO_DATA", "SOLO_RUNS", "SOLO_INIT"):  # paths are irrelevant to the plan
        os.environ.setdefault(var, "/unused")
    from megatron_patch.config import load_config

    cfg = load_config(args.config, args.overrides)
    plan = memory_plan(cfg, args.vocab, args.gpus)
    p, t = cfg.parallel, cfg.training
    recompute = t.recompute if t.recompute != "full" else f"full/{t.recompute_method}/{t.recompute_num_layers}"
    print(f"{Path(args.config).name}: {plan['parameters']['total'] / 1e9:.3f}B parameters "
          f"(vocab padded to {plan['vocab_padded']}); TP={p.tensor_model_parallel_size} "
          f"PP={p.pipeline_model_parallel_size} DP={plan['dp']} SP={p.sequence_parallel} on {args.gpus} GPUs; "
          f"seq {cfg.data.seq_length}, micro-batch {cfg.data.micro_batch_size}, recompute {recompute}")
    for key in ("weights_gib", "grad_buffers_gib", "optimizer_gib", "activations_gib", "logits_gib", "total_gib"):
        print(f"  {key[:-4]:<14} {plan[key]:7.1f} GiB")
    print(f"  margin         {args.gpu_gib - plan['total_gib']:7.1f} GiB of {args.gpu_gib:.0f} "
          "(CUDA context, NCCL buffers, fragmentation)")
    if args.compare:
        choice, best = fastest_fitting(cfg, args.vocab, args.gpus, args.gpu_gib, args.margin_gib)
        if choice is None:
            print(f"  no recompute setting fits {args.gpu_gib:.0f} GiB with {args.margin_gib:.0f} GiB free")
        else:
            print(f"  fastest fitting with {args.margin_gib:.0f} GiB free: recompute={choice[0]} "
                  f"recompute_method={choice[1]} recompute_num_layers={choice[2]} ({best['total_gib']:.1f} GiB)")


if __name__ == "__main__":
    main()
