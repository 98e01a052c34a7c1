"""Shared by the tests: one intra-op thread, and the small fixtures of the CLI tests."""

import json

import pytest
import torch

# One intra-op thread: on a busy 2-core machine, tiny recurrent models run many times
# slower with two threads fighting each other (see README, "Threads").
torch.set_num_threads(1)


@pytest.fixture
def arrays(tmp_path):
    """12 random-walk sequences of 3 dimensions as .npy files."""
    from test_cli import make_arrays
    return make_arrays(tmp_path / "arrays")


@pytest.fixture
def tiny_config(tmp_path):
    """A --config file with a tiny model."""
    from test_cli import TINY
    p = tmp_path / "tiny.json"
    p.write_text(json.dumps(TINY))
    return p
