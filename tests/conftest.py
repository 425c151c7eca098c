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


# Property tests draw the same examples on every run (CI must not pass or fail by luck);
# ARVID_HYPOTHESIS_RANDOM=1 draws fresh ones, e.g. with ARVID_HYPOTHESIS_EXAMPLES=1500 for a deep search.
try:
    import os

    from hypothesis import settings

    settings.register_profile("arvid", derandomize=not os.environ.get("ARVID_HYPOTHESIS_RANDOM"))
    settings.load_profile("arvid")
except ImportError:  # hypothesis is a dev extra
    pass
