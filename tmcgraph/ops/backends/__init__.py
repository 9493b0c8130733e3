"""Contraction backends: modules with ``einsum``, ``tensordot`` and ``transpose``.

``tmcgraph.ops.backends.log`` is the log-space sum-product semiring used for every TMC
contraction.
"""

from . import log

__all__ = ["log"]
