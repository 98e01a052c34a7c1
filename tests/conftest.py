"""Shared by the tests: one intra-op thread, and the small fixtures of the CLI tests."""

import json

import pytest
import torch

# One intra-op thread: on a busy 2-core machine, tiny recurrent models run many times
# slower with two threads fighting each other (see README, "Threads").
torch.set_num_threads(1)


@pytest.fixture(params=["compiled", "python"])
def loops(request):
    """Runs a test with the compiled loops (csrc/: the fused scans, the KVAE's filter) and
    with the Python ones; the float64 checks run the compiled loops too."""
    from vrnn import compiled
    on = request.param == "compiled"
    if on and not compiled.available():
        pytest.skip(f"the compiled loops did not build here: {compiled._state['error']}")
    with compiled.using(on, float64=on):
        yield request.param


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
