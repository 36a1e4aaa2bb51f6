"""synthgen: a service for synthetic image datasets from trained GAN and VAE checkpoints."""

__version__ = "0.1.0"
