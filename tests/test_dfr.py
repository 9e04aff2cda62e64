"""DFR options (input reflection padding, image tap, per-channel standardisation) and their set-up."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from trainer.fit import TrainConfig, fit, normalise, read_checkpoint, restore_model
from trainer.models import create_model

TILE = 48


def stripes(n: int = 3, size: int = 48) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return [np.clip(128 + 60 * np.sin(xx / (3 + i)) * np.cos(yy / 5) + rng.normal(0, 4, (size, size)), 0,
                    255).astype(np.uint8)[:, :, None] for i in range(n)]


def config(**changes) -> TrainConfig:
    return dataclasses.replace(TrainConfig(steps=1, tile=TILE, lr=1e-3, pca_samples=3), **changes)


def dfr(**options):
    torch.manual_seed(0)
    return create_model("dfr", "s", pretrained=False, **options)


def test_defaults_pad_the_input_and_keep_the_map_size():
    model = dfr(latent=4).eval()
    assert model.taps == (2, 4, 8) and model.input_pad == 32 and model.standardise
    x = torch.randn(2, 3, TILE, TILE)
    assert model.raw_regional_features(x).shape == (2, model.in_channels, TILE // 4, TILE // 4)
    assert model(x).shape == (2, 1, TILE // 4, TILE // 4)
    unpadded = dfr(latent=4, input_pad=0).eval()
    unpadded.load_state_dict(model.state_dict())
    with torch.no_grad():
        centre = (slice(None), slice(None), slice(4, 8), slice(4, 8))
        far, near = model(x), unpadded(x)
    assert not torch.allclose(far, near)  # the border differs ...
    assert far[centre].shape == near[centre].shape  # ... on the same grid


@pytest.mark.parametrize("pad", [-16, 10, 20])
def test_input_pad_must_keep_the_grids_aligned(pad):
    with pytest.raises(ValueError, match="input_pad"):
        dfr(input_pad=pad)


def test_image_tap_adds_the_input_channels():
    assert dfr(taps=(1, 4)).in_channels == 3 + 24
    model = dfr(taps=(1, 4), latent=4).eval()
    assert model(torch.randn(1, 3, TILE, TILE)).shape == (1, 1, TILE // 4, TILE // 4)
    with pytest.raises(ValueError, match="backbone tap"):
        dfr(taps=(1,))
    with pytest.raises(ValueError, match="invalid"):
        dfr(taps=(3,))


@pytest.mark.slow  # two short trainings: ~5 s on an idle 2-core CPU
def test_training_sets_the_feature_statistics_and_standardises():
    model = dfr()
    history = fit(model, stripes(), config())
    assert bool(model.stats_set) and history["latent"] == model.latent
    x = normalise(torch.from_numpy(np.stack(stripes())).permute(0, 3, 1, 2).float().expand(-1, 3, -1, -1)
                  / 255.0, model.input_mean, model.input_std)
    f = model.regional_features(x).transpose(0, 1).flatten(1)
    assert f.mean(dim=1).abs().max() < 1.0 and 0.3 < float(f.std(dim=1).median()) < 3.0
    raw = dfr(standardise=False)
    fit(raw, stripes(), config())
    assert not bool(raw.stats_set)
    assert torch.equal(raw.regional_features(x), raw.raw_regional_features(x))


def test_set_feature_stats_checks_its_input():
    model = dfr()
    with pytest.raises(ValueError, match="N x"):
        model.set_feature_stats(torch.zeros(10, 5))


@pytest.mark.slow  # ~5 s on an idle 2-core CPU (30 s under the team's load)
def test_checkpoint_restores_statistics_and_latent(tmp_path):
    path = tmp_path / "ckpt.pt"
    trained = dfr()
    fit(trained, stripes(), config(checkpoint_path=str(path)))
    fresh = restore_model(dfr(), read_checkpoint(path)).eval()
    trained.eval()
    x = torch.randn(1, 3, TILE, TILE)
    with torch.no_grad():
        assert torch.equal(trained(x), fresh(x))
    assert torch.equal(trained.feature_std, fresh.feature_std) and bool(fresh.stats_set)
