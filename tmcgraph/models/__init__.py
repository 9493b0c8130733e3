"""Models from the papers, declared with the public API: the linear-Gaussian toys, the TMC paper's MNIST VAE
and Burda et al.'s IWAE models.

Not imported by ``import tmcgraph``; import the module you need
(``from tmcgraph.models import toys``).
"""

__all__ = ["toys", "mnist_vae", "burda"]
