"""Suite-wide test settings."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # The models under test are tiny: one intra-op thread is as fast as two on an idle runner, and
    # far faster on a busy one (OpenMP threads spin against other processes).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
