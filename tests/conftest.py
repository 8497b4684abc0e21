"""Shared pytest settings and fixtures (plain helpers live in helpers.py, megatron_tiny.py, hf_tiny.py and
sft_fixtures.py; no test module imports another)."""

import os
import subprocess

import pytest


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # One thread of CPU math per worker (set before torch is imported): torch's default, a thread per
        # core in each of the workers, would oversubscribe the cores.
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    # Slow tests (a minute or more on 2 CPU cores) run by default; `-m "not slow"` skips them.
    config.addinivalue_line("markers", "slow: takes a minute or more on a 2-core CPU")
    # Tests that start processes (a CLI, a training, torchrun, accelerate); `-m "not e2e"` runs the in-process rest.
    config.addinivalue_line("markers", "e2e: starts processes (a CLI, a training, torchrun, accelerate)")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> str:
    """A SOLO tokenizer (the tiny 32,000-entry base extended with the vision tokens), saved once."""
    from solo.tiny import make_base_tokenizer
    from solo.tokenizer import extend_tokenizer

    path = tmp_path_factory.mktemp("tokenizer")
    extend_tokenizer(make_base_tokenizer()).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def megatron_world():
    """A megatron-core world of one process in this process (gloo, TP=PP=1), for in-process models."""
    import torch.distributed as dist

    from megatron_patch import compat

    compat.apply()
    from megatron.core import parallel_state, tensor_parallel

    from solo.processes import free_local_port

    created = False
    if not dist.is_initialized():
        store = dist.TCPStore("127.0.0.1", free_local_port(), 1, is_master=True)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        created = True
    parallel_state.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    with compat.device_scope():
        yield
    parallel_state.destroy_model_parallel()
    if created:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """The tiny local Mistral base checkpoint (`solo.tiny`)."""
    from solo.tiny import make_base_checkpoint

    return make_base_checkpoint(tmp_path_factory.mktemp("base") / "mistral")


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB filesystem (tmpfs; needs root): writing past it fails with ENOSPC like a full disk."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    """A randomly initialised tiny SOLO checkpoint (`solo create` of the tiny base)."""
    from solo.create import create_solo_checkpoint
    from solo.tiny import make_base_checkpoint

    root = tmp_path_factory.mktemp("eval-model")
    base = make_base_checkpoint(root / "base")
    return create_solo_checkpoint(base, root / "solo", seed=0)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """A 24-question multiple-choice colour task (`helpers.write_colour_task`)."""
    from helpers import write_colour_task

    return write_colour_task(tmp_path_factory.mktemp("eval-task"), count=24, seed=1)
