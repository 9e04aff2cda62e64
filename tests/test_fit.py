"""Losses and training loops: quantile beyond 2**24, losses go down, seeds reproduce, checkpoints resume."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from trainer import losses
from trainer.fit import CheckpointError, TrainConfig, fit, inject_noise_patches, pretrain_teacher
from trainer.models import create_model

TILE = 64


def textures(n: int = 3, size: int = 72, mono: bool = False) -> list[np.ndarray]:
    """Smooth periodic textures with a little noise: learnable, unlike white noise."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    out = []
    for i in range(n):
        base = 128 + 60 * np.sin(xx / (3 + i)) * np.cos(yy / 5) + rng.normal(0, 4, (size, size))
        img = np.clip(base, 0, 255).astype(np.uint8)
        out.append(img if mono else np.stack([img, np.roll(img, 3, 0), np.roll(img, 5, 1)], axis=-1))
    return out


def efficientad(seed: int = 0):
    torch.manual_seed(seed)
    return create_model("efficientad", "s", tile=TILE)


def config(**changes) -> TrainConfig:
    base = TrainConfig(steps=6, tile=TILE, teacher_steps=0, lr=1e-3, progress_every=1)
    return dataclasses.replace(base, **changes)


def mean(values) -> float:
    return float(np.mean(values))


# ------------------------------------------------------------------ losses

@pytest.mark.parametrize("q", [0.0, 0.25, 0.5, 0.999, 1.0])
def test_quantile_matches_torch(q):
    x = torch.randn(1001, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(losses.quantile(x, q), torch.quantile(x, q))


@pytest.mark.parametrize("descending", [True, False])
def test_quantile_beyond_2_pow_24_elements(descending):
    n = 2 ** 24 + 3
    x = torch.arange(n, dtype=torch.float32)  # sorted input: the worst case of quickselect (kthvalue)
    x = x.flip(0) if descending else x
    with pytest.raises(RuntimeError):
        torch.quantile(x, 0.5)  # the limit this function exists for
    for q in (0.0, 0.999, 1.0):
        expected = q * (n - 1)  # the sorted values are 0, 1, ..., n - 1
        assert float(losses.quantile(x, q)) == pytest.approx(expected, rel=1e-6, abs=0.01)


def test_hard_feature_loss_keeps_the_top_quantile():
    teacher = torch.zeros(1, 4, 10, 10)
    student = torch.zeros(1, 4, 10, 10)
    student[0, 0, 0, :4] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    # 400 squared diffs; the 0.99 quantile lies between 1 and 4 -> top values are 4, 9, 16
    loss = losses.hard_feature_loss(teacher, student, q=0.99)
    diff = ((teacher - student) ** 2).flatten()
    expected = diff[diff >= torch.quantile(diff, 0.99)].mean()
    assert torch.isclose(loss, expected)


def test_anomaly_push_and_cdo_use_the_mask():
    d = torch.full((1, 1, 4, 4), 0.2)
    empty = torch.zeros_like(d)
    mask = empty.clone()
    mask[..., :2, :2] = 1.0
    assert float(losses.anomaly_push_loss(d, empty)) == 0.0
    assert float(losses.anomaly_push_loss(d, mask)) == pytest.approx(0.8)
    assert float(losses.cdo_loss(d, mask)) > float(losses.cdo_loss(d, None))
    uneven = torch.linspace(0, 1, 16).view(1, 1, 4, 4)
    assert float(losses.cdo_loss(uneven)) > float(uneven.mean())  # large discrepancies weigh more


def test_noise_patches_mark_what_they_change():
    x = torch.full((8, 3, TILE, TILE), 0.5)
    out, mask = inject_noise_patches(x, torch.Generator().manual_seed(0), fraction=1.0)
    changed = (out != x).any(dim=1, keepdim=True)
    assert bool(changed.any()) and bool((changed <= (mask > 0)).all())
    assert torch.equal(x, torch.full_like(x, 0.5))  # input untouched


# ------------------------------------------------------------------ training

@pytest.mark.slow  # ~4 s on an idle 2-core CPU, 25 s under load
def test_efficientad_student_and_ae_losses_go_down():
    # one image of exactly the tile size: no crop noise; AE loss starts near 1 (unit-normalised teacher)
    history = fit(efficientad(), textures(1, TILE), config(steps=15, lr=3e-4))
    for part in ("st", "ae"):
        values = history["parts"][part]
        assert mean(values[-5:]) < mean(values[:5]), part
    assert len(history["loss"]) == 15 and history["steps"] == 15


@pytest.mark.slow  # ~5 s on an idle 2-core CPU
def test_teacher_distillation_loss_goes_down_and_sets_statistics():
    model = efficientad()
    history = pretrain_teacher(model, textures(), config(teacher_steps=20))
    assert mean(history["loss"][-5:]) < mean(history["loss"][:5])
    assert bool(model.teacher_trained)
    assert not torch.equal(model.teacher_std, torch.ones_like(model.teacher_std))
    assert not any(p.requires_grad for p in model.teacher.parameters())


def test_dfr_latent_from_pca_and_loss_goes_down():
    torch.manual_seed(0)
    model = create_model("dfr")
    history = fit(model, textures(mono=True), config(steps=25, pca_samples=4))
    assert 1 <= history["latent"] == model.latent <= model.in_channels
    assert mean(history["loss"][-5:]) < mean(history["loss"][:5])
    assert model(torch.zeros(1, 3, TILE, TILE)).shape == (1, 1, TILE // 4, TILE // 4)


def test_same_seed_same_weights_and_progress_reports():
    calls = []
    first, second = efficientad(), efficientad()
    fit(first, textures(), config(teacher_steps=3), progress=lambda s, t, info: calls.append((s, t)))
    fit(second, textures(), config(teacher_steps=3))
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert calls[-1] == (6, 6) and (3, 3) in calls  # teacher steps, then student steps
    third = efficientad()
    fit(third, textures(), config(teacher_steps=3, seed=1))
    assert not torch.equal(third.student[0].weight, first.student[0].weight)


@pytest.mark.parametrize("option", [{"synthetic_anomalies": True}, {"cdo": True},
                                    {"synthetic_anomalies": True, "cdo": True}])
def test_thesis_options_change_the_loss(option):
    plain = fit(efficientad(), textures(), config(steps=4))
    changed = fit(efficientad(), textures(), config(steps=4, **option))
    assert np.all(np.isfinite(changed["loss"]))
    assert changed["loss"] != plain["loss"]
    if option.get("synthetic_anomalies") and not option.get("cdo"):
        assert "push" in changed["parts"]


def test_penalty_images_add_a_penalty_term():
    history = fit(efficientad(), textures(), config(steps=3, penalty_images=tuple(textures(2, 80))))
    assert len(history["parts"]["penalty"]) == 3 and min(history["parts"]["penalty"]) > 0


def test_checkpoint_resume_continues_exactly(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    reference = efficientad()
    fit(reference, textures(), config(teacher_steps=2))

    def interrupt(step, total, info):
        if "loss" in info and step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(efficientad(), textures(), config(teacher_steps=2, checkpoint_path=path, checkpoint_every=3),
            progress=interrupt)
    resumed = efficientad(seed=5)  # different init: everything must come from the checkpoint
    history = fit(resumed, textures(), config(teacher_steps=2, checkpoint_path=path, resume=True))
    assert history["start_step"] == 3 and len(history["loss"]) == 6
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name


def test_corrupt_or_foreign_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(CheckpointError, match="corrupt"):
        fit(efficientad(), textures(), config(checkpoint_path=str(path), resume=True))
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match="not an edge-inspect"):
        fit(efficientad(), textures(), config(checkpoint_path=str(path), resume=True))
    fit(efficientad(), textures(), config(steps=1, checkpoint_path=str(path)))
    torch.manual_seed(0)
    with pytest.raises(CheckpointError, match="efficientad-s"):
        fit(create_model("dfr", latent=4), textures(), config(checkpoint_path=str(path), resume=True))


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="smaller than the tile"):
        fit(efficientad(), textures(size=40), config())
    with pytest.raises(ValueError, match="uint8"):
        fit(efficientad(), [np.zeros((80, 80, 3), np.float32)], config())
    with pytest.raises(ValueError, match="tile=128"):
        fit(efficientad(), textures(size=130), config(tile=128))
    with pytest.raises(ValueError, match="resume needs"):
        TrainConfig(resume=True)
