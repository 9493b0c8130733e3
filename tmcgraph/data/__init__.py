"""Dataset loaders: MNIST (:mod:`~tmcgraph.data.mnist`) and the hierarchical radon and NYC bus-breakdown
data (:mod:`~tmcgraph.data.hierarchical`). Not imported by ``import tmcgraph``.
"""

__all__ = ["mnist", "hierarchical"]
