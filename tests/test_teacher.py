"""EfficientAD teachers: the shipped files (sha256 verified on load, finite features, corruption refused),
the distillation target's alignment with the PDN outputs, and `train`'s teacher choice."""

from __future__ import annotations

import argparse
import json
import shutil

import numpy as np
import pytest
import torch

from trainer.models import create_model
from trainer.teacher import (
    ASSETS_DIR,
    CONTEXT,
    DistillConfig,
    TeacherError,
    _DistillTarget,
    distill_teacher,
    file_sha256,
    load_shipped_teacher,
    load_teacher,
    save_teacher,
    shipped_teacher_path,
)

SIZES = ("s", "m")


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 spinning OpenMP threads are far slower on the shared cores
    yield
    torch.set_num_threads(before)


def _model(size: str = "s"):
    torch.manual_seed(0)
    return create_model("efficientad", size, tile=64)


@pytest.mark.parametrize("size", SIZES)
def test_shipped_teacher_matches_its_sha256_and_gives_finite_features(size):
    path, sha = shipped_teacher_path(size)
    assert path.is_file() and path.parent == ASSETS_DIR
    assert file_sha256(path) == sha
    model = _model(size)
    untrained = model.teacher[0].weight.detach().clone()
    info = load_shipped_teacher(model)
    assert bool(model.teacher_trained) and info["steps"] > 0
    assert not torch.equal(model.teacher[0].weight, untrained)
    assert all(p.dtype == torch.float32 for p in model.teacher.parameters())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = model.teacher_raw(x)
    assert features.shape == (2, 384, 16, 16) and torch.isfinite(features).all()
    assert float(features.std()) > 0


def test_manifest_records_how_the_teachers_were_made():
    """Provenance only: how far the shipped distillation got is reported in docs/teacher.md, not asserted."""
    manifest = json.loads((ASSETS_DIR / "teachers.json").read_text())
    assert manifest["sources"] and manifest["procedural_textures"]
    for size in SIZES:
        entry = manifest["teachers"][size]
        assert entry["command"].startswith(f"python -m trainer.distill --size {size}")
        assert entry["batch_size"] >= 8 and entry["steps"] > 0 and entry["images"] > 0
        assert np.isfinite([entry["loss_first_10"], entry["loss_last_50"], entry["seconds"]]).all()


def _corrupt_copy(tmp_path, size="s"):
    path, sha = shipped_teacher_path(size)
    copy = tmp_path / path.name
    shutil.copy(path, copy)
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of the weights
    copy.write_bytes(bytes(data))
    return copy, sha


def test_corrupted_teacher_is_refused_with_a_clear_error(tmp_path):
    copy, sha = _corrupt_copy(tmp_path)
    with pytest.raises(TeacherError, match="fails its sha256 check"):
        load_teacher(_model(), copy, sha)


def test_corrupted_shipped_teacher_is_refused(tmp_path, monkeypatch):
    copy, _ = _corrupt_copy(tmp_path)
    shutil.copy(ASSETS_DIR / "teachers.json", tmp_path / "teachers.json")
    monkeypatch.setattr("trainer.teacher.ASSETS_DIR", tmp_path)
    model = _model()
    with pytest.raises(TeacherError, match="sha256"):
        load_shipped_teacher(model)
    assert not bool(model.teacher_trained)


def test_missing_or_foreign_teacher_file(tmp_path):
    with pytest.raises(TeacherError, match="does not exist"):
        load_teacher(_model(), tmp_path / "nope.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a teacher")
    with pytest.raises(TeacherError, match="corrupt"):
        load_teacher(_model(), garbage)
    small = create_model("efficientad", "s", tile=64)
    path = tmp_path / "teacher-s.pt"
    save_teacher(path, small.teacher, "s", {})
    with pytest.raises(TeacherError, match="efficientad-s"):
        load_teacher(_model("m"), path)


def test_fp16_file_loads_back_as_fp32(tmp_path):
    source = _model()
    path = tmp_path / "t.pt"
    save_teacher(path, source.teacher, "s", {"note": "x"}, half=True)
    target = _model()
    assert load_teacher(target, path, file_sha256(path)) == {"note": "x"}
    for a, b in zip(source.teacher.parameters(), target.teacher.parameters(), strict=True):
        assert b.dtype == torch.float32
        torch.testing.assert_close(a.half().float(), b)


@torch.no_grad()
def test_target_cells_sit_under_the_pdn_outputs():
    """The bug that kept the old distillation at a loss of ~1: target and PDN output were not at the same
    place. A dot under PDN output i (view pixel CONTEXT + 16 + 4 i) must move target cell i most."""
    target = _DistillTarget(64)
    background = torch.full((1, 3, 128, 128), 0.5)
    base = target.raw(background)
    for i in (1, 4, 6):
        view = background.clone()
        c = CONTEXT + 16 + 4 * i
        view[..., c - 1:c + 2, c - 1:c + 2] = 1.0
        change = ((target.raw(view) - base) ** 2).sum(dim=1)[0]
        row, col = divmod(int(change.argmax()), change.shape[-1])
        assert abs(row - i) <= 1 and abs(col - i) <= 1, (i, row, col)


def _textures(n=4, size=96):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    return [np.clip(128 + 60 * np.sin(xx / (3 + i)) * np.cos(yy / 5) + rng.normal(0, 4, (size, size)), 0, 255)
            .astype(np.uint8)[:, :, None].repeat(3, axis=2) for i in range(n)]


@pytest.mark.slow  # ~20 s on a quiet 2-core CPU
def test_distillation_loss_falls_below_one():
    torch.manual_seed(0)
    teacher = create_model("efficientad", "s", tile=64).teacher
    result = distill_teacher(teacher, _textures(), DistillConfig(crop=48, steps=60, batch_size=8, lr=1e-3),
                             (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert np.mean(result["loss"][-10:]) < 0.9 < np.mean(result["loss"][:5])
    assert not any(p.requires_grad for p in teacher.parameters())


def _args(**changes):
    base = {"teacher": "shipped", "teacher_steps": 0}
    return argparse.Namespace(**{**base, **changes})


def test_train_uses_the_shipped_teacher_by_default():
    from trainer.cli import UsageError, build_parser, choose_teacher

    parsed = build_parser().parse_args(["train", "--folder", "x", "--out", "y"])
    assert parsed.teacher == "shipped" and parsed.teacher_steps == 0 and parsed.steps == "auto"
    model = _model()
    assert choose_teacher(model, parsed)["teacher"] == "shipped" and bool(model.teacher_trained)
    with pytest.raises(UsageError, match="--teacher-steps"):
        choose_teacher(_model(), _args(teacher="none"))
    untrained = _model()
    assert choose_teacher(untrained, _args(teacher="none", teacher_steps=5)) == {"teacher": "none"}
    assert not bool(untrained.teacher_trained)
    assert choose_teacher(create_model("dfr", latent=4), _args()) == {}
