"""Shared fixtures: tiny data sets in their real on-disk formats."""
from pathlib import Path

import pytest
import torch

from helpers import write_imagenet_folder


@pytest.fixture(scope="session")
def imagenet_folder(tmp_path_factory) -> Path:
    return write_imagenet_folder(tmp_path_factory.mktemp("imagenet"))


@pytest.fixture
def float64_default():
    """float64 as torch's default dtype for one test (brute-force maths), restored afterwards so
    other tests are unaffected."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
