"""GPU training throughput of a ~1B-parameter SOLO proxy on 32K packs: flex vs per-document attention.

    python bench/bench_train_gpu.py [--out gpu_bench.json] [--steps 2] [--backends flex,local] [--leg-timeout 65]
    python bench/bench_train_gpu.py --tiny --backends local     # CPU smoke run of the same code (tests)

One GPU. The model is SOLO's architecture at ~1B parameters (20 layers, hidden 2048, 16 query / 4 KV
heads, SwiGLU 5632, sliding window 4096, the 33,029-token SOLO vocabulary, the patch projection),
trained exactly as ``megatron_patch.train`` trains (its build_model / build_optimizer / forward_step:
bf16, megatron-core DDP, distributed optimizer, fused cross-entropy, schedules, grad clip 1.0) on
32,768-token packs of a realistic stage-2 document mix (by documents: captioned images .53, web
text .31, web screenshots with HTML .16; images at typical SOLO patch grids) built through the real
sample path (make_training_sample, collate_packed). Every pack starts with one long text document
of 8-16K tokens, two to four times the sliding window, so the windowed attention is what is timed.

Each backend is one leg, in its own process (fresh memory, its own compile) under its own time
limit: ``flex`` (PyTorch flex_attention, the path ``backend: auto`` takes on a GPU without
Transformer Engine) and ``local`` (the per-document SDPA path, the CPU path). The JSON is written
after every leg, and a leg cut off by its limit keeps the steps it timed. Per backend: tokens/s,
MFU and peak memory; then the ratio flex/local. Tokens/s and MFU count real tokens only (no
padding); the FLOPs are the trainer's (``megatron_patch.train.step_flops``: attention over the
causal pairs inside each real document and its sliding window); the peak is the chip's dense bf16
peak (H100/H200: 989 TFLOP/s). Goals: MFU >= 40% (flex), flex/local >= 3x. Recompute is the least
the memory plan allows on this GPU (bench/memory_plan.py), none on an H200. The CUDA allocator runs
with expandable segments (``PYTORCH_CUDA_ALLOC_CONF``), as the launchers set it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# Before torch sets up CUDA: the patch count, hence every activation's size, changes per micro-batch.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

SEQ = 32768
TINY_SEQ = 2048
WINDOW, TINY_WINDOW = 4096, 256  # the tiny run's window is shorter than its long documents too
VOCAB = 33029
PAD = 0
VPATCH, VISION, VROW_SEP, VISION_END = 32001, 32000, 32002, 32004
# Patch grids (rows, cols) of typical images in SOLO's data at up to 1024 px (fit mode).
IMAGE_GRIDS = [(7, 7), (12, 16), (16, 12), (16, 16), (18, 32), (24, 32), (32, 24), (32, 32)]


def proxy_config(backend: str, micro_batches: int, steps: int, tiny: bool = False):
    """The ~1B SOLO proxy as a training Config (``tiny``: a 2-layer fp32 stand-in for CPU smoke runs)."""
    from megatron_patch.config import Config, ModelConfig

    size = (dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2)
            if tiny else dict(num_layers=20, hidden_size=2048, ffn_hidden_size=5632, num_attention_heads=16,
                              num_query_groups=4))
    cfg = Config(model=ModelConfig(**size, vocab_size=VOCAB, sliding_window=TINY_WINDOW if tiny else WINDOW,
                                   backend=backend))
    cfg.data.seq_length = TINY_SEQ if tiny else SEQ
    cfg.data.micro_batch_size, cfg.data.global_batch_size = 1, micro_batches
    cfg.data.pad_token_id = PAD
    cfg.training.train_iters = steps
    cfg.training.bf16 = not tiny
    cfg.training.recompute = "none"
    cfg.optimizer.warmup_iters = 1
    cfg.checkpoint.save = None
    return cfg


def choose_recompute(cfg) -> None:
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("memory_plan", REPO / "bench" / "memory_plan.py")
    plan = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plan)
    gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    choice, _ = plan.fastest_fitting(cfg, VOCAB, 1, gib, margin_gib=max(10.0, 0.12 * gib))
    if choice is None:
        choice = ("full", "uniform", 1)
    cfg.training.recompute, cfg.training.recompute_method, cfg.training.recompute_num_layers = choice


def realistic_pack(rng, seq: int = SEQ) -> dict:
    """One pack (PackedReader contract): a long text document of seq/4 to seq/2 tokens (8-16K at
    32K), then the stage-2-like document mix, filled to >= 99%."""
    import numpy as np

    tokens, loss, vpi, cu, n_patches = [], [], [], [0], 0

    def text(n):
        return [1] + list(rng.integers(100, 32000, n)) + [2]

    def document():
        kind = rng.choice(3, p=[0.53, 0.31, 0.16])
        if kind == 1:  # web text: log-normal lengths, median ~700 tokens, a few up to a whole pack
            return text(int(min(seq - 2, max(16, rng.lognormal(6.6, 1.1)))))
        rows, cols = IMAGE_GRIDS[rng.integers(len(IMAGE_GRIDS))]
        if kind == 2:  # screenshot + HTML
            rows, cols = 32, 18
        body = [VISION]
        for r in range(rows):
            body += [VPATCH] * cols + ([VROW_SEP] if r < rows - 1 else [])
        body.append(VISION_END)
        return [1] + body + text(int(rng.integers(10, 80)) if kind == 0 else int(rng.integers(500, 2000)))[1:]

    misses = 0
    doc = text(int(rng.integers(seq // 4, seq // 2 + 1)) - 2)
    while doc is not None:
        ids = np.asarray(doc)
        doc_vpi = np.full(len(doc), -1, dtype=np.int64)
        where = np.nonzero(ids == VPATCH)[0]
        doc_vpi[where] = n_patches + np.arange(len(where))
        n_patches += len(where)
        tokens += doc
        vpi += doc_vpi.tolist()
        loss += [0] + [0 if t in (VPATCH, VISION, VROW_SEP, VISION_END) else 1 for t in doc[1:]]
        cu.append(len(tokens))
        doc = None
        while doc is None and seq - len(tokens) >= 64 and misses < 50:
            doc = document()
            if len(tokens) + len(doc) > seq:
                doc, misses = None, misses + 1  # smaller documents for the rest (best fit, as solo-data packs)
    return dict(
        tokens=np.asarray(tokens, np.int32), loss_mask=np.asarray(loss, np.uint8), cu_seqlens=np.asarray(cu, np.int32),
        patches=rng.integers(0, 256, (n_patches, 3072), dtype=np.uint8), vision_patch_indices=np.asarray(vpi, np.int64),
    )


def run_backend(backend: str, steps: int, warmup: int, micro_batches: int, packs: int,
                recompute: str = "plan", tiny: bool = False, report=print) -> dict:
    """Train ``warmup + steps`` steps with one backend in this process; ``report(figures)`` after
    every timed step (the figures so far), and return the last.
    ``recompute``: ``plan`` (the least the memory plan allows) or ``full`` (every layer)."""
    import numpy as np
    import torch
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_patch import train as T
    from megatron_patch.data import collate_packed, make_training_sample

    cfg = proxy_config(backend, micro_batches, warmup + steps, tiny)
    seq = cfg.data.seq_length
    cuda = torch.cuda.is_available()
    if recompute == "full":
        cfg.training.recompute, cfg.training.recompute_method, cfg.training.recompute_num_layers = "full", "uniform", 1
    elif cuda:
        choose_recompute(cfg)
    T.init_distributed(cfg)
    if backend == "flex" and cuda:
        from megatron_patch.preflight import check_attention

        check_attention(cfg)
    model, tconfig = T.build_model(cfg)
    optimizer, scheduler = T.build_optimizer(cfg, model)
    tconfig.finalize_model_grads_func = finalize_model_grads
    tconfig.no_sync_func = model.no_sync
    # As the trainer counts them (megatron_patch.train.train).
    n_params = T.count_parameters(model)
    n_projection = n_params - T.count_parameters(model, exclude="vision_patch_projection")
    n_matmul = T.count_parameters(model, exclude="word_embeddings") - n_projection

    rng = np.random.default_rng(0)
    batches = []
    for i in range(packs):
        sample = make_training_sample(realistic_pack(rng, seq), seq, PAD)
        batch = collate_packed([dict(sample, sample_id=str(i))])
        # Pinned, as the training DataLoader's pin_memory makes them: host-to-device copies overlap.
        batches.append({k: v.pin_memory() if cuda and isinstance(v, torch.Tensor) else v for k, v in batch.items()})
    window = cfg.model.sliding_window
    lengths = [n for b in batches for n in b["doc_lengths"]]
    forward_backward = get_forward_backward_func()
    times, real_tokens, flops = [], [], []
    figures = dict(
        backend=backend, parameters=n_params, sliding_window=window, longest_document=max(lengths),
        documents_longer_than_window=sum(n > window + 1 for n in lengths), documents=len(lengths),
    )
    model.train()
    for step in range(warmup + steps):
        chosen = [batches[(step * micro_batches + m) % packs] for m in range(micro_batches)]
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        model.zero_grad_buffer()
        optimizer.zero_grad()
        forward_backward(forward_step_func=lambda it, m: T.forward_step({"batches": [], "nan": False}, it, m),
                         data_iterator=iter(chosen), model=[model], num_microbatches=micro_batches,
                         seq_length=seq, micro_batch_size=1, forward_only=False)
        ok, _, _ = optimizer.step()
        scheduler.step(increment=micro_batches)
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        if not ok:
            raise RuntimeError(f"{backend}: optimizer step {step} was skipped (non-finite gradients)")
        if step < warmup:
            continue
        real = sum(b["real_tokens"] for b in chosen)
        pairs = sum(T.attention_pairs(b["doc_lengths"], window) for b in chosen)
        patches = sum(int(b["patches"].shape[0]) for b in chosen)
        flops.append(T.step_flops(cfg, n_matmul, n_projection, real, patches, pairs))
        times.append(elapsed)
        real_tokens.append(real)
        peak = T.peak_flops_per_device(cfg) or 989e12
        figures.update(
            recompute=f"{cfg.training.recompute}/{cfg.training.recompute_method}/{cfg.training.recompute_num_layers}",
            tokens_per_s=sum(real_tokens) / sum(times),
            mfu=sum(flops) / sum(times) / peak,
            step_time_s=times,
            timed_steps=len(times),
            real_token_fraction=sum(real_tokens) / (seq * micro_batches * len(times)),
            peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            peak_tflops=peak / 1e12,
        )
        report(figures)
    return figures


def _leg(cmd: list, env: dict, timeout: float) -> tuple[Optional[dict], Optional[str]]:
    """Run one leg's process under its time limit: its last figures (None if it timed no step) and,
    if it failed or was stopped, why with the end of its output. A leg stopped by its limit keeps the
    steps it timed. The leg runs in a session of its own, so that the stop reaches its compile
    workers too; its output goes to a file, which no worker left behind can hold open."""
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            problem = None if proc.wait(timeout=timeout) == 0 else f"rc={proc.returncode}"
        except subprocess.TimeoutExpired:
            problem = f"stopped at its time limit ({timeout:.0f} s)"
        finally:  # also when this process is interrupted: no leg goes on running on the GPU
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        out.seek(0)
        text = out.read()
    lines = [line for line in text.splitlines() if line.startswith("RESULT ")]
    figures = json.loads(lines[-1][len("RESULT "):]) if lines else None
    if figures is not None and problem:
        figures["incomplete"] = problem
    return figures, problem and f"{problem}: {text[-3000:]}"


def write_report(report: dict, path: str) -> None:
    """The ratio and the goals from what is there, then the JSON (after every leg)."""
    flex, local = report.get("flex", {}), report.get("local", {})
    if "tokens_per_s" in flex and "tokens_per_s" in local:
        report["flex_over_local"] = flex["tokens_per_s"] / local["tokens_per_s"]
    report["goals"] = {
        "flex_mfu_at_least_40pct": flex.get("mfu", 0) >= 0.40,
        "flex_at_least_3x_per_document": report.get("flex_over_local", 0) >= 3.0,
    }
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_bench.json")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per backend (after --warmup)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--micro-batches", type=int, default=2, help="32K packs per step")
    ap.add_argument("--packs", type=int, default=4, help="distinct packs generated (cycled)")
    ap.add_argument("--backends", default="flex,local")
    ap.add_argument("--leg-timeout", type=float, default=65.0,
                    help="seconds per backend (compile included); a leg stopped by it keeps its timed steps")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one backend, print its figures
    ap.add_argument("--recompute", default="plan", choices=("plan", "full"), help=argparse.SUPPRESS)
    ap.add_argument("--tiny", action="store_true", help="2-layer fp32 model on 2K packs (CPU smoke run)")
    args = ap.parse_args()
    if args.one:
        import torch.distributed as dist

        from megatron_patch import compat

        compat.apply()  # inert on GPU; the CPU smoke run needs the redirects
        with compat.device_scope():
            run_backend(args.one, args.steps, args.warmup, args.micro_batches, args.packs, args.recompute,
                        args.tiny, report=lambda figures: print("RESULT " + json.dumps(figures), flush=True))
        dist.destroy_process_group()
        return 0

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    report = dict(gpu=device, torch=torch.__version__, seq_length=TINY_SEQ if args.tiny else SEQ,
                  micro_batches_per_step=args.micro_batches, timed_steps=args.steps)
    backends = args.backends.split(",")
    for backend in backends:
        # The per-document path may not fit at the flex path's recompute setting (its band masks are
        # L x L per long document): it then runs with full recompute, recorded in the JSON.
        for recompute in ("plan", "full"):
            env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                       CUDA_DEVICE_MAX_CONNECTIONS="1")
            env.pop("MASTER_PORT", None)  # the leg's process group takes a free port of its own
            cmd = [sys.executable, __file__, "--one", backend, "--steps", str(args.steps), "--warmup",
                   str(args.warmup), "--micro-batches", str(args.micro_batches), "--packs", str(args.packs),
                   "--recompute", recompute] + (["--tiny"] if args.tiny else [])
            print(f"[bench] {backend}: {' '.join(cmd)}", flush=True)
            figures, problem = _leg(cmd, env, args.leg_timeout)
            report[backend] = figures or dict(error=f"recompute={recompute} {problem or 'no step timed'}")
            if figures is not None:
                print(f"[bench] {backend}: {figures['tokens_per_s']:,.0f} tokens/s, MFU {figures['mfu']:.1%}, "
                      f"peak {figures['peak_memory_gib'] or 0:.1f} GiB, recompute {figures['recompute']}, "
                      f"{figures['timed_steps']} timed steps {figures.get('incomplete', '')}", flush=True)
                break
            print(f"[bench] {backend} failed with recompute={recompute}:\n{problem}", flush=True)
            if "out of memory" not in (problem or "").lower():
                break
        write_report(report, args.out)
    print(json.dumps(report, indent=2))
    return 0 if all("tokens_per_s" in report.get(b, {}) and "incomplete" not in report[b] for b in backends) else 1


if __name__ == "__main__":
    sys.exit(main())
