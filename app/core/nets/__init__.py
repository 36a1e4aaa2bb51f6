"""The networks: a conditional DCGAN, a conditional VAE and the small evaluator classifier. Importing this package
registers every architecture, so `Checkpointable.from_pretrained` finds the class a config names."""

from app.core.nets.base import SyntheticNet
from app.core.nets.classifier import Classifier, ClassifierConfig
from app.core.nets.gan import ConditionalGAN, GanConfig
from app.core.nets.vae import ConditionalVAE, VaeConfig

__all__ = ["Classifier", "ClassifierConfig", "ConditionalGAN", "ConditionalVAE", "GanConfig", "SyntheticNet",
           "VaeConfig"]
