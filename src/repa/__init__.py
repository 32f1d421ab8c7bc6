"""repa: REPresentation Alignment (arXiv 2410.06940) as a drop-in regularizer for diffusion models."""

__version__ = "0.1.0"
