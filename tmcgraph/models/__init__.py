"""Models from the papers, declared with the public API: the linear-Gaussian toys and the MNIST VAE.

Not imported by ``import tmcgraph``; import the module you need
(``from tmcgraph.models import toys``).
"""

__all__ = ["toys", "mnist_vae"]
