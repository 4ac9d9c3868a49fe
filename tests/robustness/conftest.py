"""Every robustness test runs torch on one thread, in the test process as in its forked
children (which must: the parent's OpenMP pool does not survive fork()). Runs trained here as
references are then bit for bit comparable with runs resumed in a child; the thread count
changes the order of floating-point reductions."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
