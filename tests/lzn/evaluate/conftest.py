"""The prepared digits dataset the evaluation tests read (one per test module)."""
from pathlib import Path

import pytest

from lzn.data.prepare import PrepareConfig, prepare_dataset


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data") / "digits"
    prepare_dataset("digits", None, folder, PrepareConfig(executor="serial"), progress=False)
    return folder
