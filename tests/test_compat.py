"""megatron_patch.compat: the CPU redirects exist, work, and megatron-core still has what they patch."""

import importlib

import pytest
import torch

from megatron_patch import compat


@pytest.mark.parametrize("module,attr", compat.PATCHED_SYMBOLS)
def test_patched_symbol_still_exists(module, attr):
    """Fails loudly when a megatron-core upgrade removes a private name the redirects rely on."""
    mod = importlib.import_module(module)
    assert hasattr(mod, attr), f"{module}.{attr} disappeared: update megatron_patch/compat.py"


def test_pinned_megatron_core_version():
    import megatron.core

    assert megatron.core.__version__ == "0.16.1", (
        "compat.py redirects private megatron-core names; re-verify them before changing the pin"
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="redirects are inert on GPU")
def test_redirects_on_cpu():
    assert compat.apply() is True
    assert compat.apply() is True  # idempotent
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer import utils as mtutils

    tracker = tensor_parallel.get_cuda_rng_tracker()
    assert isinstance(tracker, compat.CpuRNGStatesTracker)
    assert isinstance(tracker, mrandom.CudaRNGStatesTracker)
    assert torch.cuda.current_device() == torch.device("cpu")
    torch.cuda.synchronize()  # no-op instead of "Torch not compiled with CUDA"
    mask = mtutils.get_default_causal_mask(4)
    assert mask.device.type == "cpu" and mask[0, 1] and not mask[1, 0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="redirects are inert on GPU")
def test_rng_tracker_fork_is_reproducible_and_isolated():
    compat.apply()
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(123, tp_rank=0, ep_rank=0, etp_rank=0)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    outside_before = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), outside_before), "fork must restore the outer RNG"
    with tracker.fork():
        b = torch.rand(4)
    assert not torch.equal(a, b), "the forked stream must advance between forks"
    tensor_parallel.model_parallel_cuda_manual_seed(123, tp_rank=0, ep_rank=0, etp_rank=0)
    with tracker.fork():
        a2 = torch.rand(4)
    assert torch.equal(a, a2), "same seed, same stream"


@pytest.mark.skipif(torch.cuda.is_available(), reason="redirects are inert on GPU")
def test_recompute_replays_dropout_bitwise():
    """Activation recompute restores the RNG so dropout masks, hence gradients, are identical."""
    compat.apply()
    from megatron.core import tensor_parallel

    def block(x):
        with tensor_parallel.get_cuda_rng_tracker().fork():
            return torch.nn.functional.dropout(x.tanh(), p=0.5, training=True) * 3.0

    x = torch.randn(64, requires_grad=True)
    tensor_parallel.model_parallel_cuda_manual_seed(7, tp_rank=0, ep_rank=0, etp_rank=0)
    block(x).sum().backward()
    plain = x.grad.clone()
    x.grad = None
    tensor_parallel.model_parallel_cuda_manual_seed(7, tp_rank=0, ep_rank=0, etp_rank=0)
    tensor_parallel.checkpoint(block, False, x).sum().backward()
    assert torch.equal(plain, x.grad)
    assert (plain == 0).any() and (plain != 0).any()  # dropout really happened


@pytest.mark.skipif(torch.cuda.is_available(), reason="redirects are inert on GPU")
def test_device_scope_rewrites_literal_cuda():
    compat.apply()
    with compat.device_scope():
        a = torch.zeros(2, device="cuda")
        b = torch.tensor([1], device=torch.device("cuda"))
        c = a.cuda()
        d = a.to("cuda")
    assert all(t.device.type == "cpu" for t in (a, b, c, d))
    with pytest.raises((RuntimeError, AssertionError)):
        torch.zeros(1, device="cuda")  # outside the scope megatron-core's CUDA literals still fail


@pytest.mark.skipif(torch.cuda.is_available(), reason="redirects are inert on GPU")
def test_clip_grad_redirect_scales_cpu_grads():
    compat.apply()
    from megatron.core.optimizer import optimizer as moptimizer

    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.full((4,), 2.0)
    moptimizer.clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=4.0)
    assert torch.allclose(p.grad, torch.full((4,), 0.5), atol=1e-6)
