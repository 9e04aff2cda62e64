"""Trainable anomaly-detection models (EfficientAD, DFR) and their backbones."""

from .dfr import DFR, pca_latent_dim
from .efficientad import EfficientAD
from .registry import MODEL_KINDS, MODEL_SIZES, create_model

__all__ = ["DFR", "EfficientAD", "MODEL_KINDS", "MODEL_SIZES", "create_model", "pca_latent_dim"]
