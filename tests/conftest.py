import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tests use tiny tensors: one thread avoids thread-pool wake-up latency on a busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
