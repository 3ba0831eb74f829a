"""Shared pytest fixtures."""
import pytest
import torch


@pytest.fixture
def one_thread():
    "Tiny tensors: one torch thread is fastest, and avoids spin-waiting when the machine is busy."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
