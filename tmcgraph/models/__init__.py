"""Models from the papers, declared with the public API: the linear-Gaussian toys, the TMC paper's MNIST VAE,
Burda et al.'s IWAE models and the hierarchical radon and NYC bus-breakdown models.

Not imported by ``import tmcgraph``; import the module you need
(``from tmcgraph.models import toys``, ``from tmcgraph.models import hierarchical``).
"""

__all__ = ["toys", "mnist_vae", "burda", "hierarchical"]
