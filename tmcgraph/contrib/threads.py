"""Torch's intra-op thread count for the span of a block, restored afterwards.

``torch.set_num_threads`` is process-global; a command's ``main()`` called from a notebook
or a test would otherwise leave its ``--threads`` behind. The thread count matters beyond
speed: a matrix product split over threads sums in another order, so runs that are meant
to agree to the last bit (e.g. data-parallel training against one process) use the same
count.
"""

import contextlib
from typing import Iterator, Optional

import torch

__all__ = ["torch_threads"]


@contextlib.contextmanager
def torch_threads(n: Optional[int] = None) -> Iterator[int]:
    """Run the block with ``torch.set_num_threads(n)`` and restore the previous count on exit.

    Args:
        n: intra-op threads for the block; ``None`` leaves the count as it is.

    Yields:
        The thread count in force inside the block.

    Raises:
        ValueError: if ``n`` is not a positive integer.

    Example:
        >>> with torch_threads(1):
        ...     torch.get_num_threads()
        1
    """
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"torch_threads: n must be a positive integer or None, got {n!r}")
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
