"""CPU redirects for megatron-core 0.16.1: the ONE place where the stack bends megatron-core.

megatron-core assumes CUDA in a handful of places. When CUDA is absent, :func:`apply` redirects
them to the CPU:

* the RNG-states tracker (used by ``model_parallel_cuda_manual_seed`` and by every attention call)
  is replaced by :class:`CpuRNGStatesTracker`, backed by the CPU generator;
* the recompute helpers ``_get_cuda_rng_state``/``_set_cuda_rng_state`` read/write the CPU RNG, so
  activation recompute replays the same dropout masks;
* ``torch.cuda.current_device()`` returns the CPU device and ``torch.cuda.synchronize()`` is a no-op;
* ``transformer.utils.get_default_causal_mask`` builds its mask on the CPU;
* ``clip_grad_by_total_norm_fp32`` (which asserts ``torch.cuda.FloatTensor``) scales CPU grads;
* literal ``device="cuda"`` tensor creations (pipeline schedules, optimizer, grad-norm helpers) are
  rewritten to the CPU inside :func:`device_scope`, a scoped ``TorchFunctionMode``.

On a machine with CUDA, :func:`apply` does nothing and :func:`device_scope` is a null context, so
GPU runs use megatron-core untouched. The patched names are private and megatron-core is pinned
exactly (setup.py); ``tests/test_compat.py`` fails loudly if any of them disappears.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from typing import Any, Callable, Iterator

import torch
from torch.overrides import TorchFunctionMode

CUDA_AVAILABLE: bool = torch.cuda.is_available()

# (module, attribute) pairs this module replaces or relies on. tests/test_compat.py checks them all.
PATCHED_SYMBOLS: tuple[tuple[str, str], ...] = (
    ("megatron.core.tensor_parallel.random", "CudaRNGStatesTracker"),
    ("megatron.core.tensor_parallel.random", "_CUDA_RNG_STATE_TRACKER"),
    ("megatron.core.tensor_parallel.random", "_CUDA_RNG_STATE_TRACKER_INITIALIZED"),
    ("megatron.core.tensor_parallel.random", "_get_cuda_rng_state"),
    ("megatron.core.tensor_parallel.random", "_set_cuda_rng_state"),
    ("megatron.core.tensor_parallel.random", "model_parallel_cuda_manual_seed"),
    ("megatron.core.tensor_parallel.random", "get_cuda_rng_tracker"),
    ("megatron.core.transformer.utils", "get_default_causal_mask"),
    ("megatron.core.fusions.fused_softmax", "get_default_causal_mask"),
    ("megatron.core.optimizer.optimizer", "clip_grad_by_total_norm_fp32"),
    ("torch.cuda", "current_device"),
    ("torch.cuda", "synchronize"),
)

_APPLIED = False


class CpuRNGStatesTracker:
    """Same API as megatron-core's ``CudaRNGStatesTracker`` (add/fork/get_states/set_states/reset),
    backed by the CPU default generator. Created as a subclass at :func:`apply` time so that
    ``isinstance(tracker, CudaRNGStatesTracker)`` checks in megatron-core keep holding."""


def _make_cpu_tracker_class() -> type:
    from megatron.core.tensor_parallel import random as mrandom

    class _CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker, CpuRNGStatesTracker):
        __doc__ = CpuRNGStatesTracker.__doc__

        def add(self, name: str, seed: int) -> None:
            self._is_initialized = True
            if seed in self.seeds_:
                raise RuntimeError(f"RNG seed {seed} already exists")
            if name in self.states_:
                raise RuntimeError(f"RNG state {name} already exists")
            self.seeds_.add(seed)
            saved = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)

        @contextlib.contextmanager
        def fork(self, name: str = mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
            if name not in self.states_:
                raise RuntimeError(f"RNG state {name} is not added")
            saved = torch.get_rng_state()
            outer_name = self._current_state_name
            if outer_name != "default-rng":
                self.states_[outer_name] = saved
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                if outer_name != "default-rng":
                    saved = self.states_[outer_name]
                torch.set_rng_state(saved)
                self._current_state_name = outer_name

    return _CpuRNGStatesTracker


def _cpu_get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False):
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


@functools.lru_cache(maxsize=32)
def _cpu_default_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, device="cpu"), diagonal=1).bool()


def _cpu_clip_grad_by_total_norm_fp32(
    parameters, max_norm: float, total_norm: float, use_decoupled_grad: bool = False
) -> None:
    """megatron-core's clip_grad_by_total_norm_fp32 without its CUDA-tensor assertion."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites ``device="cuda"`` (or an int / cuda torch.device) to the CPU, and makes
    ``Tensor.cuda()`` a no-op. Only active inside :func:`device_scope`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def device_scope() -> contextlib.AbstractContextManager:
    """Context in which megatron-core's literal CUDA tensor creations land on the CPU.

    A null context when CUDA is available. The training loop runs entirely inside it."""
    if CUDA_AVAILABLE:
        return contextlib.nullcontext()
    return _CudaToCpuMode()


def _resolve(module: str, attr: str) -> Any:
    mod = importlib.import_module(module)
    if not hasattr(mod, attr):
        raise RuntimeError(
            f"megatron_patch.compat: {module}.{attr} is gone. The CPU redirects were written for "
            f"megatron-core 0.16.1; install that exact version (pip install megatron-core==0.16.1) "
            f"or update megatron_patch/compat.py."
        )
    return getattr(mod, attr)


def check_symbols() -> None:
    """Raise if any megatron-core / torch symbol the redirects rely on is missing."""
    for module, attr in PATCHED_SYMBOLS:
        _resolve(module, attr)


# megatron-core's import-time notes that a CPU run cannot act on: TE, apex and fused kernels are
# CUDA-only (TE's torch extension is a CUDA build, apex is not on the package index), and a
# deprecation its own TransformerConfig default triggers.
CPU_NOTICES = (
    r"Transformer Engine and Apex are not installed",
    r"Apex is not installed",
    r"full scope is deprecated",
)


def quiet_cpu_notices() -> None:
    """Without CUDA, hide megatron-core's warnings about missing GPU extras (kept on GPU, where
    installing transformer-engine is the fix)."""
    if CUDA_AVAILABLE:
        return
    import warnings

    for message in CPU_NOTICES:
        warnings.filterwarnings("ignore", message=message, category=UserWarning)


def apply() -> bool:
    """Install the CPU redirects if CUDA is absent (idempotent). Returns True if applied."""
    global _APPLIED
    if CUDA_AVAILABLE:
        return False
    if _APPLIED:
        return True
    check_symbols()
    from megatron.core.optimizer import optimizer as moptimizer
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer import utils as mtutils

    tracker_cls = _make_cpu_tracker_class()
    mrandom._CUDA_RNG_STATE_TRACKER = tracker_cls()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    mrandom._get_cuda_rng_state = _cpu_get_rng_state
    mrandom._set_cuda_rng_state = _cpu_set_rng_state

    original_seed: Callable = mrandom.model_parallel_cuda_manual_seed

    @functools.wraps(original_seed)
    def _cpu_model_parallel_seed(seed: int, *args, **kwargs):
        # megatron-core seeds torch.cuda (a lazy no-op without CUDA); the default CPU generator is
        # the one that matters here. The tracker must survive a force_reset.
        kwargs.pop("force_reset_rng", None)
        torch.manual_seed(seed)
        return original_seed(seed, *args, **kwargs)

    mrandom.model_parallel_cuda_manual_seed = _cpu_model_parallel_seed
    import megatron.core.tensor_parallel as mtp

    mtp.model_parallel_cuda_manual_seed = _cpu_model_parallel_seed

    mtutils.get_default_causal_mask = _cpu_default_causal_mask
    from megatron.core.fusions import fused_softmax

    fused_softmax.get_default_causal_mask = _cpu_default_causal_mask
    moptimizer.clip_grad_by_total_norm_fp32 = _cpu_clip_grad_by_total_norm_fp32

    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda device=None: None
    _APPLIED = True
    return True
