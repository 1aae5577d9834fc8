"""Shared fixtures: tiny data sets in their real on-disk formats."""
from pathlib import Path

import pytest

from helpers import write_imagenet_folder


@pytest.fixture(scope="session")
def imagenet_folder(tmp_path_factory) -> Path:
    return write_imagenet_folder(tmp_path_factory.mktemp("imagenet"))
