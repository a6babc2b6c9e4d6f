import pytest


def pytest_collection_modifyitems(config, items):
    """Everything under tests/bench is a benchmark smoke test: marked ``bench``, so the fast
    tier (``pytest -q``) leaves it out and ``pytest -m bench`` runs it."""
    for item in items:
        if "tests/bench/" in item.nodeid.replace("\\", "/") or item.nodeid.startswith("bench/"):
            item.add_marker(pytest.mark.bench)
