"""Trainable anomaly-detection models (PatchCore, EfficientAD, DFR, reconstruction AE, MKD, TSDN, zero-shot
saliency) and their backbones."""

from .dfr import DFR, pca_latent_dim
from .efficientad import EfficientAD
from .mkd import MKD
from .patchcore import PatchCore
from .reconstruction import ReconstructionAE
from .registry import MODEL_KINDS, MODEL_SIZES, create_model
from .saliency import ZeroShotSaliency
from .tsdn import TSDN

__all__ = ["DFR", "EfficientAD", "MKD", "MODEL_KINDS", "MODEL_SIZES", "PatchCore", "ReconstructionAE", "TSDN",
           "ZeroShotSaliency", "create_model", "pca_latent_dim"]
