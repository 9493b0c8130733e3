"""Dataset loaders (MNIST). Not imported by ``import tmcgraph``."""

__all__ = ["mnist"]
