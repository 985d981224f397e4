"""Process-wide runtime settings a step needs for a while, restored afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run a block with ``torch.set_num_threads(threads)``, then restore the previous count.

    ``None`` or ``0`` leaves torch's setting alone (``train.num_threads: 0`` means torch's
    default)."""
    if not threads:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
