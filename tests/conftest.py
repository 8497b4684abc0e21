"""Shared pytest settings."""


def pytest_configure(config):
    # Slow tests (a minute or more on 2 CPU cores) run by default; `-m "not slow"` skips them.
    config.addinivalue_line("markers", "slow: takes a minute or more on a 2-core CPU")
