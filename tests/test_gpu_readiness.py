"""GPU readiness, checked on the CPU: the PyTorch-only flex attention path against the per-document
path, the always-run patch projection under overlapped gradient reduction, the start-up preflight's
messages, patch positions from the loader, recipes and the memory plan.

flex_attention runs forward-only on CPU (torch 2.13): backward, bf16 and the compiled kernels are
checked by tests/test_gpu.py on a GPU.
"""

import numpy as np
import pytest
import torch

from megatron_patch import compat

compat.apply()

from megatron.core.packed_seq_params import PackedSeqParams  # noqa: E402
from megatron.core.transformer.enums import AttnMaskType  # noqa: E402

from megatron_patch.data import collate_packed, make_training_sample, packed_seq_params  # noqa: E402
from megatron_patch.model import SoloGPTModel, build_transformer_config, solo_layer_spec  # noqa: E402
from megatron_patch.model.attention import (  # noqa: E402
    FLEX_BLOCK,
    FlexPackedAttention,
    PackedDotProductAttention,
    document_mask_params,
)
from megatron_patch.model.layer_specs import resolve_backend  # noqa: E402
from megatron_patch.train import attention_pairs  # noqa: E402
from helpers import subprocess_env  # noqa: E402
from megatron_tiny import PAD, VOCAB, documents, make_pack, text_document, tiny_config  # noqa: E402


def _qkv(lengths, heads=4, groups=2, dim=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    t = sum(lengths)
    cu = torch.tensor(np.cumsum([0] + lengths), dtype=torch.int32)
    return (torch.randn(t, heads, dim, generator=gen), torch.randn(t, groups, dim, generator=gen),
            torch.randn(t, groups, dim, generator=gen), cu)


# Documents crossing 128-token tiles, tiny ones, one longer than two tiles; row lengths that are and
# are not whole tiles.
LENGTHS = {
    "ragged": [3, 150, 7, 2, 2, 90, 1, 40],
    "whole-tiles": [200, 1, 55, 128, 128],
}


@pytest.mark.parametrize("window", [None, 5, 130], ids=["no-window", "window-5", "window-130"])
@pytest.mark.parametrize("lengths", list(LENGTHS.values()), ids=list(LENGTHS))
def test_flex_attention_forward_equals_per_document_path(megatron_world, lengths, window):
    cfg = tiny_config(sliding_window=window)  # SOLO-7B semantics: window_size = (W, 0)
    tc = build_transformer_config(cfg.model, cfg.parallel, cfg.training)
    reference = PackedDotProductAttention(tc, 1, AttnMaskType.causal, "self")
    flex = FlexPackedAttention(tc, 1, AttnMaskType.causal, "self")
    assert flex.window_left == reference.window_left == window  # both read config.window_size
    q, k, v, cu = _qkv(lengths)
    t = q.shape[0]
    thd = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=t, max_seqlen_kv=t)
    expected = reference(q, k, v, None, packed_seq_params=thd)
    out = flex(q[:, None], k[:, None], v[:, None], None,
               packed_seq_params=document_mask_params(cu, t, flex.window_left))
    assert out.shape == (t, 1, 4 * 16)
    assert (out[:, 0] - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("window", [None, 3, 200])
def test_flex_block_mask_is_exactly_the_document_window_mask(window):
    """Full tiles really are all-allowed, and every allowed pair lies in a full or partial tile."""
    lengths = [3, 150, 7, 2, 2, 90, 1, 40, 300]
    t = sum(lengths)
    cu = torch.tensor(np.cumsum([0] + lengths), dtype=torch.int32)
    params = document_mask_params(cu, t, window)
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    allowed = (doc[:, None] == doc[None, :]) & (j <= i)
    if window is not None:
        allowed &= i - j <= window
    # Reconstruct what flex computes: full tiles unmasked, partial tiles through mask_mod, others skipped.
    bm = params.block_mask
    n = -(-t // FLEX_BLOCK)
    tile_state = torch.zeros(n, n, dtype=torch.int8)  # 0 skipped, 1 partial, 2 full
    for state, num, idx in ((1, bm.kv_num_blocks, bm.kv_indices), (2, bm.full_kv_num_blocks, bm.full_kv_indices)):
        for row in range(n):
            for c in idx[0, 0, row, : num[0, 0, row]].tolist():
                assert tile_state[row, c] == 0, "a tile is listed twice"
                tile_state[row, c] = state
    per_token = tile_state.repeat_interleave(FLEX_BLOCK, 0).repeat_interleave(FLEX_BLOCK, 1)[:t, :t]
    mask_mod = bm.mask_mod(torch.zeros(()), torch.zeros(()), i.expand(t, t), j.expand(t, t))
    computed = (per_token == 2) | ((per_token == 1) & mask_mod)
    assert torch.equal(computed, allowed)
    assert not (allowed.logical_not() & (per_token == 2)).any(), "a full tile holds a masked pair"
    # The MFU's attention FLOPs count exactly these pairs (one long document and many short ones).
    assert allowed.sum().item() == attention_pairs(lengths, window)
    # Positions restart in every document (RoPE).
    assert torch.equal(params.position_ids, torch.cat([torch.arange(n) for n in lengths]))


def _model(backend, sliding_window):
    cfg = tiny_config(sliding_window)
    tc = build_transformer_config(cfg.model, cfg.parallel, cfg.training)
    torch.manual_seed(0)
    return SoloGPTModel(tc, solo_layer_spec(backend), VOCAB, 256, 10000.0).eval()


@pytest.mark.parametrize("sliding_window", [None, 6])
def test_flex_model_equals_local_model_on_a_packed_multimodal_row(megatron_world, sliding_window):
    """Same weights, one packed row of image and text documents plus padding: per-token losses
    of the flex model (forward) equal the CPU path's."""
    local = _model("local", sliding_window)
    flex = _model("flex", sliding_window)
    assert flex.flex_attention and not local.flex_attention
    flex.load_state_dict(local.state_dict())  # the same parameters: checkpoints interchange
    batch = collate_packed([dict(make_training_sample(make_pack(documents()), 160, PAD), sample_id="p")])
    kwargs = dict(input_ids=batch["tokens"], labels=batch["labels"], patches=batch["patches"],
                  vision_patch_indices=batch["vision_patch_indices"], patch_positions=batch["patch_positions"])
    with torch.no_grad():
        expected = local(packed_seq_params=packed_seq_params(batch), **kwargs)
        out = flex(packed_seq_params=packed_seq_params(batch), **kwargs)
    assert (out - expected).abs().max().item() < 1e-5


def test_fused_cross_entropy_only_in_bf16_runs(monkeypatch):
    """On a GPU megatron-core's fused cross-entropy rounds the logits' gradient to bf16: bf16 runs
    use it, fp32 runs keep the exact loss (the GPU is stood in for: only the config is built)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for bf16 in (True, False):
        cfg = tiny_config()
        cfg.training.bf16 = bf16
        tc = build_transformer_config(cfg.model, cfg.parallel, cfg.training)
        assert tc.cross_entropy_loss_fusion is bf16
        assert tc.bias_activation_fusion  # the GPU's other fusion, in both


def test_auto_backend_keeps_the_cpu_path_on_cpu():
    assert resolve_backend("auto") == "local"
    assert resolve_backend("flex") == "flex"


def test_flex_rejects_what_it_cannot_do(megatron_world):
    cfg = tiny_config()
    tc = build_transformer_config(cfg.model, cfg.parallel, cfg.training)
    flex = FlexPackedAttention(tc, 1, AttnMaskType.causal, "self")
    q, k, v, cu = _qkv([4, 4])
    thd = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=8, max_seqlen_kv=8)
    with pytest.raises(ValueError, match="DocumentMaskParams"):
        flex(q[:, None], k[:, None], v[:, None], None, packed_seq_params=thd)
    with pytest.raises(ValueError, match="window"):
        flex(q[:, None], k[:, None], v[:, None], None, packed_seq_params=document_mask_params(cu, 8, 3))
    with pytest.raises(ValueError, match="trains only on a GPU"):
        flex(q[:, None].requires_grad_(), k[:, None], v[:, None], None,
             packed_seq_params=document_mask_params(cu, 8, None))
    tc.attention_dropout = 0.1
    with pytest.raises(ValueError, match="dropout"):
        FlexPackedAttention(tc, 1, AttnMaskType.causal, "self")


def _text_only_batch():
    rng = np.random.default_rng(3)
    pack = make_pack([text_document(rng, 20), text_document(rng, 9)])
    batch = collate_packed([dict(make_training_sample(pack, 64, PAD), sample_id="t")])
    assert batch["patches"].shape[0] == 0 and batch["patch_positions"].numel() == 0
    return batch


def test_projection_runs_on_text_only_microbatch_under_overlapped_grad_reduce(megatron_world):
    """A micro-batch without images still runs the patch projection (zero rows): its gradient is
    zero and, with overlapped gradient reduction, its DDP bucket is reduced like every other
    (a skipped projection fails with 'Communication call has not been issued for this bucket')."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    cfg = tiny_config()
    tc = build_transformer_config(cfg.model, cfg.parallel, cfg.training)
    torch.manual_seed(0)
    model = SoloGPTModel(tc, solo_layer_spec("local"), VOCAB, 256, 10000.0)
    ddp = DistributedDataParallel(
        config=tc, module=model,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=True, bucket_size=1),
    )
    image_batch = collate_packed([dict(make_training_sample(make_pack(documents()), 160, PAD), sample_id="i")])
    # megatron-core learns from the first step which parameters get gradients, then expects the same.
    for batch in (image_batch, _text_only_batch()):
        ddp.zero_grad_buffer()
        losses = ddp(input_ids=batch["tokens"], labels=batch["labels"], packed_seq_params=packed_seq_params(batch),
                     patches=batch["patches"], vision_patch_indices=batch["vision_patch_indices"],
                     patch_positions=batch["patch_positions"])
        (losses * batch["loss_mask"]).sum().backward()
        ddp.finish_grad_sync()  # raises if a bucket's reduction was never issued
    grad = model.vision_patch_projection.weight.main_grad
    assert torch.count_nonzero(grad) == 0
    assert torch.count_nonzero(model.language_model.embedding.word_embeddings.weight.main_grad) > 0


def test_loader_patch_positions_match_the_patch_tokens():
    rng = np.random.default_rng(4)
    from megatron_tiny import image_document

    s0 = dict(make_training_sample(make_pack([image_document(rng, 2, 2, 0), text_document(rng, 5)]), 48, PAD),
              sample_id="a")
    s1 = dict(make_training_sample(make_pack([text_document(rng, 3), image_document(rng, 1, 3, 0)]), 48, PAD),
              sample_id="b")
    batch = collate_packed([s0, s1])
    vpi = batch["vision_patch_indices"][0]
    assert torch.equal(batch["patch_positions"], torch.nonzero(vpi >= 0).reshape(-1))
    assert batch["patch_positions"].numel() == 7
    # Real tokens exclude the padding of both samples.
    assert batch["real_tokens"] == int(s0["cu_seqlens"][-2]) + int(s1["cu_seqlens"][-2])


def test_preflight_names_the_missing_piece():
    from megatron_patch.preflight import PreflightError, check_attention, version_problems

    a100 = dict(gpu="NVIDIA A100-SXM4-80GB", compute_capability="8.0")
    assert version_problems("te", dict(a100, transformer_engine="2.10.0", flash_attn="2.8.3")) == []
    (too_new,) = version_problems("te", dict(a100, transformer_engine="2.10.0", flash_attn="2.8.3.post2"))
    assert "flash-attn 2.8.3.post2" in too_new and "pip install flash-attn==2.8.3" in too_new
    (te_new,) = version_problems("te", dict(a100, transformer_engine="2.12.0", flash_attn="2.8.3"))
    assert "transformer-engine 2.12.0" in te_new and ">=2.9,<2.12" in te_new
    (no_fa,) = version_problems("te", dict(a100, transformer_engine="2.9.0", flash_attn=None))
    assert "needs flash-attn" in no_fa and "A100" in no_fa
    h100 = dict(gpu="NVIDIA H100 80GB HBM3", compute_capability="9.0", transformer_engine="2.11.0", flash_attn=None)
    assert version_problems("te", h100) == []  # cuDNN has THD attention on Hopper
    # Here (no Transformer Engine, no GPU): the run stops before touching data, naming what to do.
    cfg = tiny_config()
    cfg.model.backend = "te"
    with pytest.raises(PreflightError, match=r"Transformer Engine is not installed: pip install -e '.\[gpu\]'"):
        check_attention(cfg)
    cfg.model.backend = "flex"
    with pytest.raises(PreflightError, match="needs a CUDA GPU"):
        check_attention(cfg)
    cfg.model.backend = "local"
    check_attention(cfg)  # plain PyTorch: nothing to check


def _bench_script(name):
    """A script of bench/ (not a package) as a module."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _saved_activation_bytes(cfg, seq):
    """Bytes the built model saves for backward in one forward (storages, parameters excluded)."""
    tc = build_transformer_config(cfg.model, cfg.parallel, cfg.training)
    torch.manual_seed(0)
    model = SoloGPTModel(tc, solo_layer_spec("local"), VOCAB, seq, 10000.0).train()
    batch = collate_packed([dict(make_training_sample(make_pack([text_document(np.random.default_rng(0), seq - 2)]),
                                                      seq, PAD), sample_id="x")])
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def keep(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        model(input_ids=batch["tokens"], labels=batch["labels"], packed_seq_params=packed_seq_params(batch),
              patches=batch["patches"], vision_patch_indices=batch["vision_patch_indices"])
    return sum(saved.values())


@pytest.mark.parametrize("recompute,method,n", [("full", "uniform", 1), ("full", "uniform", 2), ("full", "block", 1),
                                                ("full", "block", 3)])
def test_memory_plan_recompute_accounting_matches_the_built_model(megatron_world, recompute, method, n):
    """What the plan says each recompute setting keeps through the forward equals what megatron-core
    really saves in the built model (per-layer bytes measured here with recompute off)."""
    plan = _bench_script("memory_plan")
    seq, layers = 128, 4
    cfg = tiny_config()
    cfg.data.seq_length = seq
    cfg.model.num_layers = layers
    none_4 = _saved_activation_bytes(cfg, seq)
    cfg.model.num_layers = 2
    per_layer = (none_4 - _saved_activation_bytes(cfg, seq)) / 2
    outside_layers = none_4 - layers * per_layer  # embeddings, logits, loss
    cfg.model.num_layers = layers
    cfg.training.recompute, cfg.training.recompute_method, cfg.training.recompute_num_layers = recompute, method, n
    kept, _ = plan.activation_terms(cfg, tp=1, layers=layers, bytes_per_value=4, layer_bytes=per_layer)
    rope_table = seq * (cfg.model.hidden_size // cfg.model.num_attention_heads) * 4  # kept once by checkpointing
    assert _saved_activation_bytes(cfg, seq) == pytest.approx(outside_layers + kept, abs=rope_table)


def test_recipes_use_the_fastest_setting_the_memory_plan_fits(monkeypatch):
    from pathlib import Path

    from megatron_patch.config import load_config

    plan = _bench_script("memory_plan")
    for var in ("SOLO_DATA", "SOLO_RUNS", "SOLO_INIT"):
        monkeypatch.setenv(var, "/unused")
    for stage in (1, 2, 3):
        cfg = load_config(Path(__file__).resolve().parents[1] / "megatron_patch" / "recipes" / f"stage{stage}.yaml")
        p, t = cfg.parallel, cfg.training
        assert p.tensor_model_parallel_size == 2 and p.sequence_parallel
        assert p.overlap_grad_reduce and p.overlap_param_gather and cfg.optimizer.use_distributed_optimizer
        choice, best = plan.fastest_fitting(cfg, 33029, 8, 80.0, 12.0)
        assert (t.recompute, t.recompute_method, t.recompute_num_layers) == choice
        assert best["total_gib"] <= 68.0


def _fake_command(directory, name, body):
    path = directory / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


@pytest.mark.e2e
def test_launchers_set_the_device_queue_and_slurm_uses_c10d_rendezvous(tmp_path):
    """launch/pretrain.sh and launch/slurm.sbatch run the same trainer line, with one device queue and
    the CUDA allocator's expandable segments; the SLURM one with one torchrun per node, c10d
    rendezvous on the first node and elastic restarts (srun/scontrol faked)."""
    import os
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "record"
    _fake_command(bin_dir, "fakepython",
                  f'echo "CDMC=$CUDA_DEVICE_MAX_CONNECTIONS ALLOC=$PYTORCH_CUDA_ALLOC_CONF $*" >> {record}\n')
    _fake_command(bin_dir, "scontrol", 'printf "gpu-a\\ngpu-b\\n"\n')
    _fake_command(bin_dir, "srun", f'echo "srun $*" >> {record}\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=str(bin_dir / "fakepython"),
               SLURM_JOB_NODELIST="gpu-[a-b]", SLURM_JOB_NUM_NODES="2", SLURM_JOB_ID="77")
    env.pop("CUDA_DEVICE_MAX_CONNECTIONS", None)
    env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    recipe = "megatron_patch/recipes/stage1.yaml"
    subprocess.run(["bash", str(repo / "launch" / "pretrain.sh"), recipe, "training.train_iters=2"],
                   env=env, check=True)
    subprocess.run(["bash", str(repo / "launch" / "slurm.sbatch"), recipe, "training.train_iters=2"],
                   env=env, check=True)
    local, srun, slurm = record.read_text().splitlines()
    assert local.startswith("CDMC=1 ALLOC=expandable_segments:True -m torch.distributed.run "
                            "--nproc_per_node 8 --nnodes 1")
    assert local.endswith(f"-m megatron_patch.train --config {recipe} training.train_iters=2")
    assert srun.startswith("srun --kill-on-bad-exit=1")
    assert slurm.startswith("CDMC=1 ALLOC=expandable_segments:True -m torch.distributed.run "
                            "--nnodes 2 --nproc_per_node 8 --rdzv_backend c10d "
                            "--rdzv_endpoint gpu-a:29500 --rdzv_id 77 --max-restarts 3")
    assert slurm.endswith(f"-m megatron_patch.train --config {recipe} training.train_iters=2")


def test_benchmark_packs_time_the_window():
    """Every 32K benchmark pack holds one document of 8-16K tokens (2-4 windows) beside short ones,
    and decodes as a valid pack: documents tile it, patch indices are the pack's patches in order."""
    bench = _bench_script("bench_train_gpu")
    rng = np.random.default_rng(1)
    for _ in range(3):
        pack = bench.realistic_pack(rng)
        lengths = np.diff(pack["cu_seqlens"])
        assert 8192 <= lengths[0] <= 16384 and lengths[0] > bench.WINDOW + 1
        assert len(lengths) >= 10 and np.median(lengths) < 2048
        assert pack["cu_seqlens"][-1] == len(pack["tokens"]) >= 0.99 * bench.SEQ
        vpi = pack["vision_patch_indices"]
        assert np.array_equal(vpi[vpi >= 0], np.arange(len(pack["patches"])))
        assert np.array_equal(np.nonzero(vpi >= 0)[0], np.nonzero(pack["tokens"] == bench.VPATCH)[0])


@pytest.mark.e2e
def test_benchmark_leg_stopped_at_its_limit_keeps_its_figures(tmp_path):
    """A benchmark leg cut off by its time limit keeps the figures of the steps it timed, and the
    stop reaches a worker it started (which would otherwise hold the output open)."""
    import json
    import sys
    import time

    bench = _bench_script("bench_train_gpu")
    child = (
        "import json, subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print('RESULT ' + json.dumps(dict(tokens_per_s=1.0, timed_steps=1)), flush=True)\n"
        "print('RESULT ' + json.dumps(dict(tokens_per_s=2.0, timed_steps=2)), flush=True)\n"
        "time.sleep(60)\n"
    )
    start = time.monotonic()
    figures, problem = bench._leg([sys.executable, "-c", child], {}, timeout=3)
    assert time.monotonic() - start < 20
    assert figures == dict(tokens_per_s=2.0, timed_steps=2, incomplete="stopped at its time limit (3 s)")
    assert problem.startswith("stopped at its time limit")
    report = {"flex": figures}
    bench.write_report(report, str(tmp_path / "bench.json"))
    assert json.loads((tmp_path / "bench.json").read_text())["flex"]["timed_steps"] == 2


@pytest.mark.e2e
@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu(tmp_path):
    """bench/gpu_check.sh --dry-run on this CPU machine: the same script up to the CUDA parts. The
    smoke step imports, the GPU tests are collected and reported skipped, the benchmark's tiny CPU
    variant (its packs, the trainer's step, windowed real-token MFU, the JSON) runs, and the summary
    JSON says what was skipped. (No wheels here: this environment has megatron-core already; README
    "GPU check" has the command that proves the wheels in a Python 3.12 / torch 2.11 environment.)"""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "wheels").mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable, OUT=str(tmp_path / "out"),
               WHEELS=str(tmp_path / "wheels"))
    proc = subprocess.run(["bash", str(repo / "bench" / "gpu_check.sh"), "--dry-run"], env=env, capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["mode"] == "dry-run" and report["ok"] and report["stopped_at"] is None
    assert report["install"]["status"].startswith("skipped: no wheels")
    assert report["smoke"]["steps"]["imports"]["status"] == "ok"
    assert {report["smoke"]["steps"][s]["status"] for s in ("matmul", "compile", "flex")} == {"skipped"}
    tests = report["tests"]
    assert tests["rc"] == 0 and tests["tests"] == tests["skipped"] >= 5 and tests["failures"] == tests["errors"] == 0
    local = report["benchmark"]["local"]
    assert local["tokens_per_s"] > 0 and local["mfu"] > 0 and local["timed_steps"] == 1
    assert 0.95 <= local["real_token_fraction"] < 1.0  # padding is not counted as work
    assert local["longest_document"] > local["sliding_window"] + 1 and local["documents_longer_than_window"] >= 1
    assert set(report["benchmark"]["goals"]) == {"flex_mfu_at_least_40pct", "flex_at_least_3x_per_document"}
    assert len(report["skipped"]) == 3 and "GPU tests" in report["skipped"][1]


@pytest.mark.e2e
def test_trainer_runs_in_one_process_resume_exactly(tmp_path):
    """tests/train_in_one_process.py, with which the GPU check compiles once for all its trainer runs:
    the GPU test's save/resume sequence on CPU in ONE process. Every run after the first starts
    cleanly, and the runs resumed from each checkpoint format give the uninterrupted run's losses
    exactly (fp32 on CPU)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from train_in_one_process import resume_sequence

    repo = Path(__file__).resolve().parents[1]
    runs = resume_sequence(tmp_path, str(repo / "megatron_patch" / "recipes" / "debug_cpu.yaml"),
                           "checkpoint.keep_last=3")
    env = subprocess_env(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("MASTER_PORT", None)
    proc = subprocess.run([sys.executable, str(repo / "tests" / "train_in_one_process.py"),
                           json.dumps(runs["full"] + runs["split"])], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [line for line in proc.stdout.splitlines() if line.startswith("RUN ")] == [
        "RUN 0 rc=0", "RUN 1 rc=0", "RUN 2 rc=0", "RUN 3 rc=0"]

    def records(name):
        return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    full, split = records("full"), records("split")
    assert [r["step"] for r in full] == [r["step"] for r in split] == [1, 2, 3]
    assert [(r["loss"], r["sample_ids"]) for r in split] == [(r["loss"], r["sample_ids"]) for r in full]
    assert full[0]["loss"] != full[2]["loss"]  # the steps really train
