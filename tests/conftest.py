"""Shared pytest fixtures."""
import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line('markers', 'browser: drives JupyterLab in headless Chromium (tests/test_browser.py); '
                                       'skips without Chromium, fails then with COURSE_LIB_BROWSER_TEST=required')


@pytest.fixture
def one_thread():
    "Tiny tensors: one torch thread is fastest, and avoids spin-waiting when the machine is busy."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
