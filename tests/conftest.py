"""Shared test settings.

Every test runs with one intra-op thread, as the launched training runs do (OMP_NUM_THREADS=1): on a
2-core machine shared with other jobs, two OpenMP threads can stall a tiny model's step for seconds
while one waits for a core. Set SDLITE_TEST_THREADS to change it.
"""

import os

import pytest
import torch

from pipelines import TextToImagePipeline
from sdlite.data.shapes import write_dataset
from sdlite.models import build_components


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("SDLITE_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(threads)


# The training tests' data and latent/text cache, one of each per test module (module scope), so a
# module's runs share a warm cache while modules stay independent.
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("shapes"), count=16, seed=0, holdout=4)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def pipe():
    """Our pipeline on the tiny preset's random weights, quiet; one per module (a module that changes it
    defines its own)."""
    pipe = TextToImagePipeline(**build_components("tiny", seed=0).as_dict())
    pipe.set_progress_bar_config(disable=True)
    return pipe
