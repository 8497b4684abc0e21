"""GPU start-up check: can this machine run the recipe's attention at all?

``megatron_patch.train`` calls :func:`check_attention` on GPU right after the process groups exist
and before any data or checkpoint is touched. It first checks the versions that are known not to
work together (:func:`version_problems`), then runs ONE attention forward and backward at the
recipe's shapes (packed THD rows of several documents, GQA, the sliding window, bf16) through the
backend the run will use. A failure stops the run with a :class:`PreflightError` that names the
missing or incompatible piece (Transformer Engine, flash-attn, cuDNN, the GPU) and what to install,
instead of Transformer Engine's "No dot product attention backend is available" hours into a job.
"""

from __future__ import annotations

import importlib.metadata
from typing import Optional

import torch

# megatron-core 0.16.1 supports these Transformer Engine releases; they disable flash-attn newer
# than FLASH_ATTN_MAX (a post-release such as 2.8.3.post2 counts as newer).
TE_MIN, TE_BELOW = "2.9", "2.12"
FLASH_ATTN_MAX = "2.8.3"
GPU_EXTRA = "pip install -e '.[gpu]' (transformer-engine[pytorch]>=2.9,<2.12 and flash-attn==2.8.3)"


class PreflightError(RuntimeError):
    """The GPU cannot run the recipe's attention; the message says what to install or change."""


def _version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _newer(version: str, limit: str) -> bool:
    """PEP 440 comparison, as Transformer Engine makes it (post and local releases count as newer)."""
    from packaging.version import Version

    return Version(version) > Version(limit)


def attention_environment() -> dict:
    """Versions that decide which attention kernels exist here."""
    env = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "transformer_engine": _version("transformer-engine") or _version("transformer_engine"),
        "flash_attn": _version("flash-attn") or _version("flash_attn"),
        "gpu": None,
        "compute_capability": None,
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    return env


def version_problems(backend: str, env: dict) -> list[str]:
    """Known-bad combinations for ``backend`` (``te`` or ``flex``), each a sentence with the fix."""
    problems = []
    if backend == "te":
        te = env.get("transformer_engine")
        if te is None:
            problems.append(f"model.backend=te but Transformer Engine is not installed: {GPU_EXTRA}, "
                            "or use model.backend=flex (PyTorch only)")
        else:
            from packaging.version import Version

            if not Version(TE_MIN) <= Version(te) < Version(TE_BELOW):
                problems.append(f"transformer-engine {te} is installed; megatron-core 0.16.1 needs "
                                f">=2.9,<2.12: {GPU_EXTRA}")
        fa = env.get("flash_attn")
        if fa is not None and _newer(fa, FLASH_ATTN_MAX):
            problems.append(
                f"flash-attn {fa} is newer than 2.8.3, which Transformer Engine 2.9-2.11 refuse to use; "
                "on GPUs where cuDNN has no packed-THD attention (A100) no attention backend is then "
                "left: pip install flash-attn==2.8.3")
        if te is not None and fa is None and (env.get("compute_capability") or "").startswith("8."):
            problems.append(
                f"{env.get('gpu')} (sm {env.get('compute_capability')}) needs flash-attn for Transformer "
                "Engine's packed (THD) attention (its cuDNN backend has none there): pip install flash-attn==2.8.3")
    elif backend == "flex":
        if not _newer(torch.__version__.split("+")[0], "2.5.99"):
            problems.append(f"model.backend=flex needs torch >= 2.6 (flex_attention with GQA); torch "
                            f"{torch.__version__} is installed")
    return problems


def _describe(env: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in env.items())


def _attention_module(cfg, backend: str, tconfig):
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_patch.model.attention import FlexPackedAttention
    from megatron_patch.model.layer_specs import solo_layer_spec_te

    if backend == "te":
        spec = solo_layer_spec_te()
        cls = spec.submodules.self_attention.submodules.core_attention
    else:
        cls = FlexPackedAttention
    return cls(config=tconfig, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")


def check_attention(cfg, tokens: Optional[int] = None) -> None:
    """Run one forward+backward of the recipe's core attention (per TP rank) or raise PreflightError.

    ``tokens``: length of the test row (default: the recipe's ``data.seq_length``, at most 32,768),
    split into documents of which one is longer than the sliding window when the row allows.
    Backends other than ``te`` and ``flex`` (``local``: plain PyTorch SDPA) need no check.
    """
    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron_patch.model.attention import _window_left, document_mask_params
    from megatron_patch.model.layer_specs import resolve_backend
    from megatron_patch.model.model import build_transformer_config

    backend = resolve_backend(cfg.model.backend)
    if backend not in ("te", "flex"):
        return
    env = attention_environment()
    problems = version_problems(backend, env)
    if problems:
        raise PreflightError("GPU preflight failed before any data or checkpoint was touched:\n  - "
                             + "\n  - ".join(problems) + f"\n  ({_describe(env)})")
    if not torch.cuda.is_available():
        raise PreflightError(f"model.backend={backend} needs a CUDA GPU; none is visible ({_describe(env)})")

    m, tp = cfg.model, cfg.parallel.tensor_model_parallel_size
    tconfig = build_transformer_config(cfg.model, cfg.parallel, cfg.training)
    total = tokens or min(cfg.data.seq_length, 32768)
    window = m.sliding_window or total
    # Documents: one longer than the window (if the row allows), then a few short ones.
    first = min(total, window + window // 2 + 1)
    bounds = [0, first]
    while bounds[-1] < total:
        bounds.append(min(total, bounds[-1] + max(1, (total - first) // 3 + 1)))
    device = torch.device("cuda", torch.cuda.current_device())
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    d = m.hidden_size // m.num_attention_heads
    heads, groups = m.num_attention_heads // tp, m.num_query_groups // tp
    dtype = torch.bfloat16 if cfg.training.bf16 else torch.float32
    try:
        attention = _attention_module(cfg, backend, tconfig).to(device)
        gen = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(total, heads, d, device=device, dtype=dtype, generator=gen, requires_grad=True)
        k = torch.randn(total, groups, d, device=device, dtype=dtype, generator=gen, requires_grad=True)
        v = torch.randn(total, groups, d, device=device, dtype=dtype, generator=gen, requires_grad=True)
        if backend == "te":
            params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                     max_seqlen_q=max(b - a for a, b in zip(bounds, bounds[1:])),
                                     max_seqlen_kv=max(b - a for a, b in zip(bounds, bounds[1:])))
            out = attention(q, k, v, None, packed_seq_params=params)
        else:
            params = document_mask_params(cu, total, _window_left(tconfig))
            out = attention(q[:, None], k[:, None], v[:, None], None, packed_seq_params=params)
        out.float().sum().backward()
        torch.cuda.synchronize()
        if not bool(torch.isfinite(out).all()):
            raise PreflightError("the attention output is not finite")
    except PreflightError:
        raise
    except Exception as exc:  # the kernel libraries raise many types; all mean the same here
        hint = (f"install compatible kernels: {GPU_EXTRA}, or run the PyTorch-only path with model.backend=flex"
                if backend == "te" else "check that torch has a working Triton (torch.compile) for this GPU, "
                "or use model.backend=te with Transformer Engine")
        raise PreflightError(
            f"GPU preflight: one {backend} attention call at the recipe's shapes (packed THD, {heads} query / "
            f"{groups} KV heads per TP rank, head dim {d}, window {m.sliding_window}, {dtype}, {total} tokens) "
            f"failed before any data or checkpoint was touched: {type(exc).__name__}: {exc}\n  {hint}\n"
            f"  ({_describe(env)})"
        ) from exc
