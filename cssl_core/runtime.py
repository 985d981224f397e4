"""Process-wide runtime settings a step needs for a while, restored afterwards.

Torch is imported only by :func:`torch_threads`, so the environment helpers stay cheap to
import (``pipelines/backfill.py`` uses them in torch-free code paths).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run a block with ``torch.set_num_threads(threads)``, then restore the previous count.

    ``None`` or ``0`` leaves torch's setting alone (``train.num_threads: 0`` means torch's
    default)."""
    if not threads:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def environ_restored(keys: Iterable[str]) -> Iterator[None]:
    """Run a block, then put the environment variables ``keys`` back as they were before it
    (set to their old values, or unset), whatever the block or a library it called did."""
    before = {k: os.environ.get(k) for k in keys}
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def environment(**values: str | None) -> Iterator[None]:
    """Set (or, with ``None``, unset) environment variables for a block, then restore them."""
    with environ_restored(values):
        for key, value in values.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        yield
