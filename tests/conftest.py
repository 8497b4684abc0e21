"""Shared pytest settings and fixtures."""

import pytest


def pytest_configure(config):
    # Slow tests (a minute or more on 2 CPU cores) run by default; `-m "not slow"` skips them.
    config.addinivalue_line("markers", "slow: takes a minute or more on a 2-core CPU")


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
