"""CPU training throughput: the megatron-core path vs the HF ``SoloForCausalLM``, same model, same packs.

    python bench/bench_train_cpu.py [--seq 2048] [--steps 6] [--threads 2]

Both run one optimizer step per packed row (forward, backward, grad clip 1.0, AdamW) on identical
synthetic packs (documents of ~--doc-tokens text tokens, half with an image of up to 6x6 patches):

* megatron: SoloGPTModel (local spec, per-document SDPA attention via PackedSeqParams), megatron-core
  DDP + schedules + megatron optimizer, exactly as megatron_patch.train runs it;
* HF: SoloForCausalLM with SDPA; documents are kept apart the HF way, by position ids that restart
  per document (transformers builds a dense block-causal mask from them, given use_cache=False),
  torch AdamW + clip_grad_norm_.

Prints tokens/s for each and the ratio megatron/HF (goal >= 1.0).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=2048, help="tokens per packed row")
    p.add_argument("--steps", type=int, default=6, help="timed steps (after 2 warm-up steps)")
    # 1 thread by default: on a shared machine, multi-threaded CPU timings swing by 5-10x.
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=704)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--sliding-window", type=int, default=4096)
    p.add_argument("--doc-tokens", type=int, default=256, help="mean text tokens per document")
    return p.parse_args()


def make_pack(rng, args):
    """One pack in the PackedReader contract: documents of ~args.doc_tokens tokens, about half of
    them opening with an image of up to 6x6 patches (SOLO layout), filled to >= 97%."""
    import numpy as np

    tokens, loss, vpi, cu, patches = [], [], [], [0], []
    while True:
        n_text = max(8, int(rng.uniform(0.5, 1.5) * args.doc_tokens))
        doc, doc_loss, doc_vpi = [1], [0], [-1]
        if rng.uniform() < 0.5:
            rows, cols = (int(x) for x in rng.integers(1, 7, size=2))
            doc += [3]
            doc_loss += [0]
            doc_vpi += [-1]
            for r in range(rows):
                for _ in range(cols):
                    doc.append(4)
                    doc_loss.append(0)
                    doc_vpi.append(len(patches))
                    patches.append(rng.integers(0, 256, 3072, dtype=np.uint8))
                if r < rows - 1:
                    doc.append(5)
                    doc_loss.append(0)
                    doc_vpi.append(-1)
            doc += [6]
            doc_loss += [0]
            doc_vpi += [-1]
        doc += [int(t) for t in rng.integers(32, args.vocab, n_text)] + [2]
        doc_loss += [1] * (n_text + 1)
        doc_vpi += [-1] * (n_text + 1)
        room = args.seq - len(tokens)
        if len(doc) > room:
            if room < 16:
                break
            cut = room  # trim the last text document to fill the pack (keeps images whole)
            if any(v >= 0 for v in doc_vpi[cut:]):
                break
            doc, doc_loss, doc_vpi = doc[:cut], doc_loss[:cut], doc_vpi[:cut]
        tokens += doc
        loss += doc_loss
        vpi += doc_vpi
        cu.append(len(tokens))
        if len(tokens) >= args.seq:
            break
    # Drop patches of a trailing image that did not fit.
    used = max([v for v in vpi if v >= 0], default=-1) + 1
    return dict(tokens=np.array(tokens, np.int32), loss_mask=np.array(loss, np.uint8),
                cu_seqlens=np.array(cu, np.int32), patches=np.array(patches[:used], np.uint8).reshape(-1, 3072),
                vision_patch_indices=np.array(vpi, np.int64))


def make_batches(args, n):
    import numpy as np

    from megatron_patch.data import collate_packed, make_training_sample

    rng = np.random.default_rng(0)
    return [collate_packed([dict(make_training_sample(make_pack(rng, args), args.seq, 0), sample_id=str(i))])
            for i in range(n)]


def time_steps(step, batches, warmup=2):
    for b in batches[:warmup]:
        step(b)
    times = []
    for b in batches[warmup:]:
        t0 = time.perf_counter()
        step(b)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_megatron(args, batches):
    import torch.distributed as dist

    from megatron_patch import compat

    compat.apply()
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_patch import train as train_mod
    from megatron_patch.config import Config, ModelConfig
    from solo.processes import free_local_port

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_local_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    cfg = Config(model=ModelConfig(
        num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=args.ffn,
        num_attention_heads=args.heads, num_query_groups=args.kv_heads, vocab_size=args.vocab,
        sliding_window=args.sliding_window, backend="local", make_vocab_size_divisible_by=1,
    ))
    cfg.training.bf16 = False
    cfg.training.train_iters = args.steps + 2  # the LR schedule needs a length; its values do not matter here
    cfg.training.recompute = "none"
    cfg.data.seq_length = args.seq
    cfg.data.pad_token_id = 0
    with compat.device_scope():
        model, tconfig = train_mod.build_model(cfg)
        optimizer, _ = train_mod.build_optimizer(cfg, model)
        tconfig.finalize_model_grads_func = finalize_model_grads
        tconfig.no_sync_func = model.no_sync
        fb = get_forward_backward_func()
        n_params = sum(p.numel() for p in model.parameters())

        def step(batch):
            model.zero_grad_buffer()
            optimizer.zero_grad()
            state = {"batches": [], "nan": False}
            fb(forward_step_func=lambda it, m: train_mod.forward_step(state, it, m), data_iterator=iter([batch]),
               model=[model], num_microbatches=1, seq_length=args.seq, micro_batch_size=1, forward_only=False)
            optimizer.step()

        seconds = time_steps(step, batches)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    return seconds, n_params


def hf_inputs(batch):
    import torch

    tokens = batch["tokens"]
    cu = batch["cu_seqlens"].long()
    lengths = cu[1:] - cu[:-1]
    position_ids = torch.cat([torch.arange(int(n)) for n in lengths])[None]
    # HF shifts internally: labels[t+1] is the target of position t.
    labels = torch.full_like(tokens, -100)
    target = batch["loss_mask"][0] > 0  # position t predicts t+1
    labels[0, 1:][target[:-1]] = tokens[0, 1:][target[:-1]]
    # use_cache=False: transformers derives its packed block-causal mask from the restarting
    # position ids only when there is no cache.
    return dict(input_ids=tokens, position_ids=position_ids, labels=labels, use_cache=False,
                vision_patches=batch["patches"], vision_patch_indices=batch["vision_patch_indices"])


def bench_hf(args, batches):
    import torch

    from solo.hf.configuration_solo import SoloConfig
    from solo.hf.modeling_solo import SoloForCausalLM

    config = SoloConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(args.seq, 4096), sliding_window=args.sliding_window,
        tie_word_embeddings=False, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = SoloForCausalLM(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    n_params = sum(p.numel() for p in model.parameters())

    def step(batch):
        opt.zero_grad(set_to_none=True)
        out = model(**hf_inputs(batch))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return time_steps(step, batches), n_params


def main():
    args = parse_args()
    import torch

    torch.set_num_threads(args.threads)
    batches = make_batches(args, args.steps + 2)
    docs = sum(len(b["cu_seqlens"]) - 1 for b in batches) / len(batches)
    print(f"config: {args.layers} layers, hidden {args.hidden}, {args.heads}/{args.kv_heads} heads, ffn {args.ffn}, "
          f"vocab {args.vocab}; packs of {args.seq} tokens, {docs:.1f} documents/pack; {args.threads} threads; "
          f"torch {torch.__version__}")
    m_sec, m_params = bench_megatron(args, batches)
    h_sec, h_params = bench_hf(args, batches)
    print(f"parameters: megatron {m_params:,}  HF {h_params:,}")
    print(f"megatron-core SoloGPTModel: {args.seq / m_sec:10.0f} tokens/s  ({m_sec * 1000:.0f} ms/step)")
    print(f"HF SoloForCausalLM (sdpa):  {args.seq / h_sec:10.0f} tokens/s  ({h_sec * 1000:.0f} ms/step)")
    print(f"ratio megatron/HF: {h_sec / m_sec:.2f}x")


if __name__ == "__main__":
    main()
