"""GPU checks (skipped without CUDA; bench/gpu_check.sh runs them on a bare single-GPU machine).

On the same weights and one packed multimodal row (image and text documents, one longer than the
sliding window, padding): the GPU attention paths (flex: PyTorch flex_attention; te: Transformer
Engine, when installed) against the per-document path's fp32 result, forward AND backward; then the
real trainer on the GPU: optimizer steps with the distributed optimizer and both overlaps, async
dp_reshardable checkpoints, resume, the fully reshardable format; sequence parallelism on and off
(two GPUs and Transformer Engine).
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import DEBUG_RECIPE as RECIPE, REPO, free_port, subprocess_env

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

VOCAB, PAD, SEQ, WINDOW = 128, 0, 512, 48


@pytest.fixture(scope="module")
def gpu_world():
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    torch.cuda.set_device(0)
    store = dist.TCPStore("127.0.0.1", free_port(), 1, is_master=True)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    yield
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def _config(backend: str, bf16: bool):
    from megatron_patch.config import Config, ModelConfig

    cfg = Config(model=ModelConfig(num_layers=2, hidden_size=256, ffn_hidden_size=512, num_attention_heads=4,
                                   num_query_groups=2, vocab_size=VOCAB, sliding_window=WINDOW, backend=backend))
    cfg.training.bf16 = bf16
    cfg.training.recompute = "none"
    return cfg


def _model(backend: str, bf16: bool, reference_state=None):
    from megatron.core.transformer.module import Float16Module

    from megatron_patch.model import SoloGPTModel, build_transformer_config, solo_layer_spec

    cfg = _config(backend, bf16)
    tc = build_transformer_config(cfg.model, cfg.parallel, cfg.training)
    torch.manual_seed(0)
    model = SoloGPTModel(tc, solo_layer_spec(backend), VOCAB, SEQ, 10000.0).cuda()
    if reference_state is not None:
        state = {_te_name(k) if backend == "te" else k: v for k, v in reference_state.items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
    return (Float16Module(tc, model) if bf16 else model), model


def _te_name(local_name: str) -> str:
    """The TE spec fuses the pre-attention / pre-MLP norms into the following linear."""
    return (local_name.replace("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight")
            .replace("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"))


def _row():
    """One packed row: image documents, text documents, one text document longer than the window."""
    from megatron_patch.data import collate_packed, make_training_sample

    rng = np.random.default_rng(0)
    tokens, loss, vpi, cu, patches = [], [], [], [0], []
    for kind, size in [("image", (3, 4)), ("text", 120), ("image", (1, 2)), ("text", 5), ("image", (6, 6)),
                       ("text", 30)]:
        if kind == "image":
            rows, cols = size
            doc, doc_vpi = [1, 3], [-1, -1]
            for r in range(rows):
                for _ in range(cols):
                    doc.append(4)
                    doc_vpi.append(len(patches))
                    patches.append(rng.integers(0, 256, 3072, dtype=np.uint8))
                if r < rows - 1:
                    doc.append(5)
                    doc_vpi.append(-1)
            caption = list(rng.integers(32, VOCAB, 12))
            doc += [6] + caption + [2]
            doc_vpi += [-1] * (len(caption) + 2)
            doc_loss = [0] * (len(doc) - len(caption) - 1) + [1] * (len(caption) + 1)
        else:
            doc = [1] + list(rng.integers(32, VOCAB, size)) + [2]
            doc_vpi, doc_loss = [-1] * len(doc), [0] + [1] * (len(doc) - 1)
        tokens += doc
        vpi += doc_vpi
        loss += doc_loss
        cu.append(len(tokens))
    pack = dict(tokens=np.asarray(tokens, np.int32), loss_mask=np.asarray(loss, np.uint8),
                cu_seqlens=np.asarray(cu, np.int32), patches=np.asarray(patches, np.uint8),
                vision_patch_indices=np.asarray(vpi, np.int64))
    assert max(np.diff(cu)) > WINDOW
    return collate_packed([dict(make_training_sample(pack, SEQ, PAD), sample_id="gpu")])


def _losses_and_grads(wrapped, inner, batch):
    from megatron_patch.data import packed_seq_params

    dev = torch.device("cuda")
    psp = packed_seq_params(batch)
    psp.cu_seqlens_q = psp.cu_seqlens_kv = batch["cu_seqlens"].to(dev)
    inner.zero_grad(set_to_none=True)
    losses = wrapped(input_ids=batch["tokens"].to(dev), labels=batch["labels"].to(dev), packed_seq_params=psp,
                     patches=batch["patches"].to(dev), vision_patch_indices=batch["vision_patch_indices"].to(dev),
                     patch_positions=batch["patch_positions"].to(dev)).float()
    mask = batch["loss_mask"].to(dev)
    (losses * mask).sum().backward()
    grads = {_te_name(n): p.grad.float().clone() for n, p in inner.named_parameters() if p.grad is not None}
    return losses.detach() * mask, grads


def _compare(backend: str, bf16: bool, loss_tol: float, grad_tol: float):
    batch = _row()
    ref_wrapped, ref = _model("local", bf16=False)
    ref_losses, ref_grads = _losses_and_grads(ref_wrapped, ref, batch)
    wrapped, inner = _model(backend, bf16, reference_state=ref.state_dict())
    losses, grads = _losses_and_grads(wrapped, inner, batch)
    loss_err = (losses - ref_losses).abs().max().item()
    assert loss_err <= loss_tol, f"{backend} bf16={bf16}: per-token loss differs by {loss_err}"
    ref_grads = {_te_name(n): g for n, g in ref_grads.items()}
    assert set(grads) == set(ref_grads)
    for name, g in grads.items():
        r = ref_grads[name]
        rel = ((g - r).norm() / r.norm().clamp_min(1e-12)).item()
        assert rel <= grad_tol, f"{backend} bf16={bf16}: gradient of {name} off by {rel:.2e} (relative)"
    # The projection is used and learns from the row's patches.
    assert grads["vision_patch_projection.weight"].abs().sum() > 0


def test_flex_attention_matches_per_document_fp32_forward_and_backward(gpu_world):
    _compare("flex", bf16=False, loss_tol=2e-3, grad_tol=5e-3)


def test_flex_attention_bf16_matches_per_document_fp32(gpu_world):
    _compare("flex", bf16=True, loss_tol=6e-2, grad_tol=5e-2)


def test_transformer_engine_bf16_matches_per_document_fp32(gpu_world):
    from megatron_patch.model.layer_specs import HAVE_TE

    if not HAVE_TE:
        pytest.skip("Transformer Engine is not installed")
    _compare("te", bf16=True, loss_tol=6e-2, grad_tol=5e-2)


def test_local_masked_attention_runs_the_memory_efficient_kernel(gpu_world):
    """The per-document path's masked calls (a segment of short documents; a document longer than
    the window) repeat the K/V heads, so PyTorch's memory-efficient kernel takes them: with
    ``enable_gqa`` only the math kernel would, building the full L x L scores. With the math kernel
    ruled out they still run, in bf16, and match the fp32 result."""
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from megatron_patch.model import PackedDotProductAttention, build_transformer_config

    cfg = _config("local", bf16=True)
    tc = build_transformer_config(cfg.model, cfg.parallel, cfg.training)
    attention = PackedDotProductAttention(tc, 1, AttnMaskType.causal, "self")
    lengths = [3, 7, 20, 300, 30]  # one segment of three, one past the window (alone: > 256 tokens), one causal
    assert lengths[3] > attention.segment_tokens and lengths[3] > WINDOW + 1
    t = sum(lengths)
    cu = torch.tensor(np.cumsum([0] + lengths), dtype=torch.int32, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(t, h, 64, device="cuda", generator=gen) for h in (4, 2, 2))
    thd = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=t, max_seqlen_kv=t)
    expected = attention(q, k, v, None, packed_seq_params=thd)
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION]):
        out = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), None, packed_seq_params=thd)
    error = ((out.float() - expected).norm() / expected.norm()).item()
    assert error < 2e-2, error


def test_auto_backend_on_gpu():
    from megatron_patch.model.layer_specs import HAVE_TE, resolve_backend

    assert resolve_backend("auto") == ("te" if HAVE_TE else "flex")


# ---------------------------------------------------------------------------------------------
# The trainer on the GPU
# ---------------------------------------------------------------------------------------------

GPU_RUN = ["model.backend=flex", "training.bf16=true", "model.hidden_size=256", "model.ffn_hidden_size=512",
           "model.num_attention_heads=4", "model.num_query_groups=2", "data.seq_length=256",
           "parallel.overlap_grad_reduce=true", "parallel.overlap_param_gather=true",
           "optimizer.use_distributed_optimizer=true", "checkpoint.keep_last=3", "training.recompute=full",
           "training.recompute_method=block", "training.recompute_num_layers=1"]


def _env():
    env = subprocess_env(MASTER_ADDR="127.0.0.1", CUDA_DEVICE_MAX_CONNECTIONS="1")
    env.pop("MASTER_PORT", None)
    return env


def _metrics(save):
    lines = (Path(save) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _train(save, *overrides, nproc=1):
    env = dict(_env(), MASTER_PORT=str(free_port()))
    if nproc == 1:
        launcher = [sys.executable, "-m", "megatron_patch.train"]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                    "--master_port", str(free_port()), "-m", "megatron_patch.train"]
    proc = subprocess.run(launcher + ["--config", RECIPE, f"checkpoint.save={save}", *overrides], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return _metrics(save)


@pytest.mark.e2e
def test_trainer_steps_saves_async_and_resumes(tmp_path):
    """Distributed optimizer with both overlaps, block recompute, async saves: 3 steps in one run
    equal 1 + resume from dp_reshardable + 1 + resume from fully_reshardable + 1 (flex backward
    accumulates dQ with atomics, so the comparison allows bf16-level noise). All runs share one
    process (tests/train_in_one_process.py): flex attention and the fusions compile once."""
    from megatron.core import dist_checkpointing

    from solo.checkpoints import iteration_dir
    from train_in_one_process import resume_sequence

    runs = resume_sequence(tmp_path, RECIPE, *GPU_RUN)
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "train_in_one_process.py"),
                           json.dumps(runs["full"] + runs["split"])], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    full, split = _metrics(tmp_path / "full"), _metrics(tmp_path / "split")
    assert [r["step"] for r in full] == [r["step"] for r in split] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in full)
    assert all(0 < r["mfu"] < 1 and r["tokens_per_s"] > 0 for r in full)
    for a, b in zip(full[1:], split[1:]):
        assert b["sample_ids"] == a["sample_ids"]
        assert abs(a["loss"] - b["loss"]) <= 2e-3 * max(1.0, abs(a["loss"])), (a["step"], a["loss"], b["loss"])
    # The resumed runs read one format each: iter 1 dp_reshardable, iter 2 fully_reshardable.
    formats = {i: dist_checkpointing.load_common_state_dict(iteration_dir(str(tmp_path / "split"), i))
               ["optimizer_format"] for i in (1, 2, 3)}
    assert formats == {1: "dp_reshardable", 2: "fully_reshardable", 3: "dp_reshardable"}


@pytest.mark.e2e
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="sequence parallelism needs two GPUs (TP=2)")
def test_sequence_parallel_on_and_off_agree(tmp_path):
    from megatron_patch.model.layer_specs import HAVE_TE

    if not HAVE_TE:
        pytest.skip("sequence parallelism needs the Transformer Engine backend")
    tp2 = [o for o in GPU_RUN if not o.startswith("model.backend")] + [
        "model.backend=te", "parallel.tensor_model_parallel_size=2"]
    off = _train(tmp_path / "sp_off", *tp2, "parallel.sequence_parallel=false", nproc=2)
    on = _train(tmp_path / "sp_on", *tp2, "parallel.sequence_parallel=true", nproc=2)
    for a, b in zip(off, on):
        assert abs(a["loss"] - b["loss"]) <= 2e-2, (a["step"], a["loss"], b["loss"])
