"""The real-texture MVTec-layout set (trainer/data/textures.py): layout, disjoint regions, defects, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("skimage", reason="the texture set reads the photos shipped with scikit-image ([dev])")

from trainer.data import GOOD  # noqa: E402
from trainer.data.images import DataError  # noqa: E402
from trainer.data.mvtec import load_mvtec  # noqa: E402
from trainer.data.textures import (  # noqa: E402
    DEFECT_TYPES,
    TEXTURES,
    load_texture,
    main,
    paint_scratch,
    paint_stain,
    paint_swap,
    texture_regions,
    write_texture_tree,
)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("textures")
    write_texture_tree(root, "grass", size=64, n_train=6, n_test_good=3, n_test_defect=4, seed=3, n_val=3)
    return root


def test_every_photo_loads_and_has_a_licence():
    for name, texture in TEXTURES.items():
        photo = load_texture(name)
        assert photo.dtype == np.uint8 and photo.ndim == 2 and min(photo.shape) >= 256, name
        assert photo.std() > 10, name  # a texture, not a flat image
        assert texture.licence and texture.source
    with pytest.raises(DataError, match="unknown texture"):
        load_texture("marble")


def test_tree_loads_as_mvtec_with_masks(tree):
    splits = load_mvtec(tree, "grass", val_fraction=0.2)
    assert splits.channels == 1 and len(splits.train) == 6 and len(splits.val) == 3  # validation/good
    assert splits.info["validation"] == "validation/good" and splits.info["train_crops_overlap"] is True
    test = splits.test
    assert sorted(set(test.groups)) == sorted([GOOD, *DEFECT_TYPES])
    assert all(im.shape == (64, 64, 1) for im in test.images)
    for mask, group in zip(test.masks, test.groups, strict=True):
        assert mask.any() == (group != GOOD)


def test_training_and_test_crops_never_overlap(tree):
    manifest = json.loads((tree / "grass" / "manifest.json").read_text())
    size = manifest["size"]
    train_bottom = max(f["origin"][0] + size for k, f in manifest["files"].items() if k.startswith("train/"))
    test_top = min(f["origin"][0] for k, f in manifest["files"].items() if k.startswith("test/"))
    assert train_bottom <= manifest["train_rows"][1] < manifest["test_rows"][0] <= test_top
    assert manifest["licence"] == "CC0 1.0"


def _boxes(manifest: dict, prefix: str) -> list[tuple[int, int]]:
    return [tuple(f["origin"]) for k, f in manifest["files"].items() if k.startswith(prefix)]


def test_validation_crops_share_no_pixel_with_training_crops(tree):
    """Validation must be out of sample: no validation crop overlaps any training crop (issue 11: a random
    split of overlapping training crops set a texture's threshold in sample)."""
    manifest = json.loads((tree / "grass" / "manifest.json").read_text())
    size = manifest["size"]
    train, val = _boxes(manifest, "train/"), _boxes(manifest, "validation/")
    assert len(train) == 6 and len(val) == 3
    for vy, vx in val:
        for ty, tx in train:
            assert not (abs(vy - ty) < size and abs(vx - tx) < size), ((vy, vx), (ty, tx))
        assert vy + size <= manifest["train_rows"][1]  # from the top rows, beside the training region
    assert max(tx for _, tx in train) + size <= manifest["train_cols"][1] < manifest["validation_cols"][0]


def test_overlapping_training_crops_are_not_cross_fitted(tree):
    from types import SimpleNamespace

    from trainer.cli import _crossfit_folds

    splits = load_mvtec(tree, "grass")
    patchcore = SimpleNamespace(fits_without_training=True)
    assert _crossfit_folds(SimpleNamespace(crossfit=None), patchcore, splits) == 0
    splits.info.pop("train_crops_overlap")
    assert _crossfit_folds(SimpleNamespace(crossfit=None), patchcore, splits) == 5


def test_same_seed_same_tree(tmp_path, tree):
    write_texture_tree(tmp_path, "grass", size=64, n_train=6, n_test_good=3, n_test_defect=4, seed=3, n_val=3)
    for path in (tree / "grass").rglob("*.png"):
        assert path.read_bytes() == (tmp_path / path.relative_to(tree)).read_bytes(), path


def test_defects_change_pixels_where_the_mask_says():
    rng = np.random.default_rng(0)
    crop = load_texture("gravel")[:96, :96]
    donor = load_texture("brick")
    for image, mask, _ in (paint_scratch(crop, rng), paint_stain(crop, rng),
                           paint_swap(crop, donor, rng, foreign=True), paint_swap(crop, crop, rng, False)):
        diff = np.abs(image.astype(int) - crop.astype(int))
        assert mask.any() and diff[mask].mean() > 3 * max(diff[~mask].mean(), 0.1)


def test_stain_is_smooth_and_low_contrast():
    crop = load_texture("grass")[:128, :128]
    image, mask, params = paint_stain(crop, np.random.default_rng(1))
    ratio = image.astype(float)[mask].mean() / crop.astype(float)[mask].mean()
    assert 0.6 < ratio < 1.4 and abs(ratio - 1) > 0.08
    assert 0.15 < abs(params["gain"]) < 0.4


def test_regions_refuse_a_photo_too_small():
    train, test = texture_regions(512, 128, 0.3, 8)
    assert train.stop + 8 <= test.start and len(test) >= 128
    with pytest.raises(DataError, match="cannot hold"):
        texture_regions(200, 128, 0.3, 8)


def test_cli_writes_the_categories(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--categories", "brick", "--size", "48", "--n-train", "2",
                 "--n-test-good", "1", "--n-test-defect", "1"]) == 0
    assert (tmp_path / "brick" / "ground_truth" / "stain" / "000_mask.png").is_file()
    assert "brick" in capsys.readouterr().out
    assert main(["--out", str(tmp_path), "--categories", "brick", "--size", "16"]) == 2
    assert "size must be" in capsys.readouterr().err
