"""Shared test settings.

Every test runs with one intra-op thread, as the launched training runs do (OMP_NUM_THREADS=1): on a
2-core machine shared with other jobs, two OpenMP threads can stall a tiny model's step for seconds
while one waits for a core. Set SDLITE_TEST_THREADS to change it.
"""

import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("SDLITE_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(threads)
