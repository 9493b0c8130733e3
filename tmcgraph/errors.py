"""The one exception type tmcgraph raises for bad input."""

__all__ = ["TMCGraphError"]


class TMCGraphError(ValueError):
    """Invalid model, proposal, data or option.

    The message names the variable, edge, plate or shape at fault. It derives from
    :class:`ValueError`, so ``except ValueError`` catches it too.
    """
