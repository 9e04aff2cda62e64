"""Data loading: folders, the MVTec layout (synthetic tree), ELPV split, and the errors users will hit."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from trainer.data import GOOD, load_folder, split_good
from trainer.data.elpv import load_elpv
from trainer.data.images import DataError, check_tile, random_crop, read_image, read_images, to_channels
from trainer.data.mvtec import load_mvtec
from trainer.data.synthetic import DEFECT_TYPES, write_mvtec_tree


@pytest.fixture(scope="module")
def mvtec_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mvtec")
    write_mvtec_tree(root, "weave", size=48, n_train=10, n_test_good=3, n_test_defect=2)
    return root


def test_mvtec_layout_loads(mvtec_root):
    splits = load_mvtec(mvtec_root, "weave", val_fraction=0.2, seed=0)
    assert splits.channels == 3 and len(splits.train) == 8 and len(splits.val) == 2
    test = splits.test
    assert len(test.images) == 3 + 2 * len(DEFECT_TYPES)
    assert test.labels.tolist() == [int(g != GOOD) for g in test.groups]
    assert all(m.shape == (48, 48) and m.dtype == bool for m in test.masks)
    assert all(not m.any() for m, g in zip(test.masks, test.groups, strict=True) if g == GOOD)
    assert all(m.any() for m, g in zip(test.masks, test.groups, strict=True) if g != GOOD)
    # the painted defect is where the mask is
    spot = test.images[test.groups.index("spot")]
    assert spot[test.masks[test.groups.index("spot")]].min() == 235


def test_mvtec_resize_keeps_masks_aligned(mvtec_root):
    splits = load_mvtec(mvtec_root, "weave", resize_to=32)
    assert splits.train[0].shape == (32, 32, 3)
    assert all(m.shape == (32, 32) for m in splits.test.masks)


def test_split_is_seeded_and_disjoint():
    a_train, a_val = split_good(20, 0.25, seed=3)
    b_train, b_val = split_good(20, 0.25, seed=3)
    assert a_train.tolist() == b_train.tolist() and len(a_val) == 5
    assert not set(a_train) & set(a_val) and len(set(a_train) | set(a_val)) == 20
    assert split_good(20, 0.25, seed=4)[1].tolist() != a_val.tolist()


def _digests(images) -> list[bytes]:
    import hashlib

    return [hashlib.sha256(np.ascontiguousarray(im).tobytes()).digest() for im in images]


def test_calibration_images_are_whole_images_disjoint_from_training(tmp_path, mvtec_root):
    """Out-of-sample calibration: validation images are whole images the training split does not hold
    (folder, MVTec, ELPV), and small folders still give the two good scores a threshold needs."""
    for i in range(12):
        cv2.imwrite(str(tmp_path / f"{i}.png"), np.full((16, 16), 7 * i, np.uint8))
    folder = load_folder(tmp_path, val_fraction=0.1)
    assert len(folder.val) == 2 and len(folder.train) == 10
    mvtec = load_mvtec(mvtec_root, "weave", val_fraction=0.2, seed=0)
    for splits in (folder, mvtec):
        train, val = set(_digests(splits.train)), set(_digests(splits.val))
        assert not train & val and len(train) == len(splits.train)
        if splits.test is not None:
            assert not set(_digests(splits.test.images)) & (train | val)


@pytest.mark.skipif(not __import__("importlib").util.find_spec("elpv_dataset"), reason="needs elpv-dataset")
def test_elpv_splits_are_disjoint_cells():
    from trainer.data.elpv import elpv_labels

    splits = load_elpv("mono", seed=0, limit=120)
    names = set(splits.test.names)
    train, val = set(_digests(splits.train)), set(_digests(splits.val))
    assert not train & val and not (train | val) & set(_digests(splits.test.images))
    assert len(names) == len(splits.test.names)  # every test cell once
    assert len(elpv_labels()[0]) == 2624


def test_folder_and_channels(tmp_path):
    for i in range(4):
        cv2.imwrite(str(tmp_path / f"{i}.png"), np.full((20, 24), 10 * i, np.uint8))
    splits = load_folder(tmp_path, val_fraction=0.25)
    assert splits.channels == 1 and splits.train[0].shape == (20, 24, 1)
    assert to_channels(splits.train[0], 3).shape == (20, 24, 3)
    images, paths = read_images(tmp_path, limit=2, seed=1)
    assert len(images) == 2 and paths == sorted(paths)


def test_errors_name_the_path(tmp_path):
    with pytest.raises(DataError, match="does not exist") as info:
        read_images(tmp_path / "nope")
    assert info.value.path == tmp_path / "nope"
    with pytest.raises(DataError, match="no images"):
        read_images(tmp_path)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot read image") as info:
        read_image(bad)
    assert info.value.path == bad


def test_wrong_channel_count_in_folder(tmp_path):
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((8, 8), np.uint8))
    cv2.imwrite(str(tmp_path / "b.png"), np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(DataError, match="channel"):
        read_images(tmp_path)


def test_mismatched_and_missing_mask(tmp_path):
    cat = write_mvtec_tree(tmp_path, "weave", size=32, n_train=3, n_test_good=1, n_test_defect=1)
    mask = cat / "ground_truth" / "spot" / "000_mask.png"
    cv2.imwrite(str(mask), np.zeros((16, 16), np.uint8))
    with pytest.raises(DataError, match="mask .* is 16x16"):
        load_mvtec(tmp_path, "weave")
    mask.unlink()
    with pytest.raises(DataError, match="missing"):
        load_mvtec(tmp_path, "weave")


def test_tile_larger_than_image():
    with pytest.raises(DataError, match="tile 64 is larger"):
        check_tile([np.zeros((32, 40, 1), np.uint8)], 64)
    with pytest.raises(DataError, match="larger"):
        random_crop(np.zeros((32, 40, 1), np.uint8), 64, np.random.default_rng(0))
    crop = random_crop(np.zeros((32, 40, 1), np.uint8), 16, np.random.default_rng(0))
    assert crop.shape == (16, 16, 1)


def test_elpv_split_limited():
    a = load_elpv("mono", seed=0, limit=120)
    b = load_elpv("mono", seed=0, limit=120)
    assert a.channels == 1 and a.train[0].shape == (300, 300, 1) and a.train[0].dtype == np.uint8
    info = a.info
    assert info["n_train"] + info["n_val"] + info["n_test_good"] + info["n_test_defect"] \
        + info["n_prob_0.33"] + info["n_prob_0.67"] == 120
    assert a.test.names == b.test.names  # seeded
    groups = set(a.test.groups)
    assert {"good", "defect"} <= groups and set(a.test.separate_groups) == {"prob_0.33", "prob_0.67"}
    assert all(lbl == int(g != GOOD) for lbl, g in zip(a.test.labels, a.test.groups, strict=True))
    with pytest.raises(DataError, match="cell type"):
        load_elpv("cigs", limit=10)
