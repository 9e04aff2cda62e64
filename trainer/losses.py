"""Training losses of EfficientAD and DFR, and a quantile that works on any number of elements.

EfficientAD (Batzner et al., WACV 2024): hard feature loss, autoencoder loss, student-autoencoder loss,
penalty.
Thesis options: ``anomaly_push_loss`` (synthetic anomalies push the student away from the teacher) and
``cdo_loss`` (collaborative discrepancy optimisation, Cao et al., IEEE TII 2023).
All discrepancy maps ``d`` are B x 1 x h x w (channel mean of squared differences) unless stated.
Other kinds: ``reconstruction_loss`` (autoencoder MSE), ``mkd_loss`` (MKD value + direction), ``tsdn_loss``
(TSDN normal reconstruction + abnormal mask + feature-normality compactness).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["quantile", "hard_feature_loss", "ae_loss", "student_ae_loss", "penalty_loss", "anomaly_push_loss",
           "cdo_loss", "dfr_loss", "reconstruction_loss", "mkd_loss", "tsdn_loss"]


def quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """q-quantile of all elements of x (linear interpolation, like torch.quantile), for any size.

    torch.quantile refuses inputs over 2**24 elements. This reads the one or two order statistics it needs
    with ``topk`` on the shorter tail of the flattened tensor
    (kthvalue can take quadratic time on sorted input).
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile q must be in [0, 1], got {q}")
    flat = x.reshape(-1)
    n = flat.numel()
    if n == 0:
        raise ValueError("quantile of an empty tensor")
    pos = q * (n - 1)
    lo = min(int(pos), n - 1)
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    if lo < n - 1 - lo:  # lower tail: the (hi + 1) smallest, ascending
        values = flat.topk(hi + 1, largest=False, sorted=True).values
        lo_val, hi_val = values[lo], values[hi]
    else:  # upper tail: the (n - lo) largest, descending
        values = flat.topk(n - lo, largest=True, sorted=True).values
        lo_val, hi_val = values[n - 1 - lo], values[n - 1 - hi]
    return lo_val if frac == 0.0 else lo_val + (hi_val - lo_val) * frac


def hard_feature_loss(teacher: torch.Tensor, student: torch.Tensor, q: float = 0.999) -> torch.Tensor:
    """Mean of the squared student-teacher differences at or above their q-quantile (EfficientAD eq. 1)."""
    diff = (teacher - student) ** 2
    d_hard = quantile(diff.detach(), q)
    return diff[diff >= d_hard].mean()


def ae_loss(teacher: torch.Tensor, ae: torch.Tensor) -> torch.Tensor:
    """Autoencoder reconstructs the (normalised) teacher features."""
    return ((teacher - ae) ** 2).mean()


def student_ae_loss(ae: torch.Tensor, student_ae: torch.Tensor) -> torch.Tensor:
    """Student's second half predicts the autoencoder output (the autoencoder is not updated by this term)."""
    return ((ae.detach() - student_ae) ** 2).mean()


def penalty_loss(student_on_penalty: torch.Tensor) -> torch.Tensor:
    """Keeps the student's teacher-half near zero on out-of-distribution (ImageNet-style) images."""
    return (student_on_penalty ** 2).mean()


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weight = mask.to(values.dtype)
    return (values * weight).sum() / weight.sum().clamp(min=1.0)


def anomaly_push_loss(d: torch.Tensor, mask: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Synthetic anomalies: hinge pushing the discrepancy ``d`` above ``margin`` on masked pixels.

    Bounded (zero once d >= margin), so it cannot diverge; zero when the mask is empty.
    """
    return _masked_mean(torch.relu(margin - d), mask > 0.5)


def cdo_loss(d: torch.Tensor, mask: torch.Tensor | None = None, gamma: float = 2.0,
             margin: float = 1.0) -> torch.Tensor:
    """Collaborative discrepancy optimisation (CDO), adapted to unnormalised features.

    Normal pixels are weighted by (d / mean d) ** gamma, so the hardest (largest) discrepancies dominate
    and are pulled down; synthetic-anomaly pixels (mask) are weighted by (mean d_a / d_a) ** gamma, so the
    smallest anomalous discrepancies dominate, and are pushed up through the bounded hinge relu(margin - d)
    instead of the paper's -d (their features are L2-normalised and bounded, ours are not). Weights carry
    no gradient.
    """
    normal = torch.ones_like(d, dtype=torch.bool) if mask is None else mask <= 0.5
    d_n = d[normal]
    w_n = (d_n / d_n.mean().clamp(min=1e-12)).detach() ** gamma
    loss = (w_n * d_n).sum() / w_n.sum().clamp(min=1e-12)
    if mask is not None and bool((mask > 0.5).any()):
        d_a = d[mask > 0.5]
        w_a = (d_a.mean() / d_a.clamp(min=1e-12)).detach() ** gamma
        loss = loss + (w_a * torch.relu(margin - d_a)).sum() / w_a.sum().clamp(min=1e-12)
    return loss


def dfr_loss(features: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """DFR: MSE between regional features and their reconstruction."""
    return ((features - reconstruction) ** 2).mean()


def reconstruction_loss(x: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """Reconstruction autoencoder: MSE between the (normalised) image and its reconstruction."""
    return ((x - reconstruction) ** 2).mean()


def mkd_loss(pairs: list[tuple[torch.Tensor, torch.Tensor]], direction_weight: float = 1.0
             ) -> dict[str, torch.Tensor]:
    """MKD (Salehi et al., CVPR 2021): per depth, value loss (mean squared difference of expert and cloner
    features) and direction loss (1 - cosine similarity, per location over channels), summed over depths."""
    value = sum(((e - c) ** 2).mean() for e, c in pairs)
    direction = sum((1.0 - F.cosine_similarity(e, c, dim=1, eps=1e-6)).mean() for e, c in pairs)
    return {"value": value, "direction": direction_weight * direction}


def tsdn_loss(streams: dict[str, torch.Tensor], clean: torch.Tensor, mask: torch.Tensor,
              mask_weight: float = 1.0, compact_weight: float = 0.1) -> dict[str, torch.Tensor]:
    """TSDN: the normal decoder rebuilds the clean image (MSE), the abnormal decoder finds the filled
    superpixels (BCE on logits, ``mask`` B x 1 x H x W in {0, 1}), and the bottleneck features stay close to
    their prototype-based normal estimate (compactness, weight ``compact_weight``)."""
    return {"rec": ((streams["reconstruction"] - clean) ** 2).mean(),
            "mask": mask_weight * F.binary_cross_entropy_with_logits(streams["mask_logits"], mask),
            "fne": compact_weight * ((streams["features"] - streams["normal"]) ** 2).mean()}
