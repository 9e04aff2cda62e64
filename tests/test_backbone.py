"""EfficientNet-Lite0: strict loading, TF SAME padding, taps, ImageNet sanity; torchvision error paths."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from trainer.models.backbones import BackboneUnavailable, efficientnet_lite0, torchvision_backbone
from trainer.models.backbones.efficientnet_lite import (
    BLOCK_TABLE,
    INPUT_MEAN,
    INPUT_STD,
    TAP_CHANNELS,
    default_weights_path,
    same_pad,
)


@pytest.fixture(scope="module")
def lite0():
    return efficientnet_lite0()


@pytest.fixture(scope="module")
def weight_file():
    return torch.load(default_weights_path(), map_location="cpu", weights_only=True)


def test_strict_load_of_all_296_tensors(lite0, weight_file):
    state = lite0.state_dict()
    assert len(weight_file) == 296
    assert set(state) == set(weight_file)
    for name, tensor in weight_file.items():
        assert torch.equal(state[name], tensor), name


def test_block_table_matches_weight_shapes(weight_file):
    index = 0
    for expand, kernel, _stride, out_ch, repeats in BLOCK_TABLE:
        for _ in range(repeats):
            depthwise = weight_file[f"_blocks.{index}._depthwise_conv.weight"]
            project = weight_file[f"_blocks.{index}._project_conv.weight"]
            assert depthwise.shape[-2:] == (kernel, kernel)
            assert project.shape[0] == out_ch
            assert (f"_blocks.{index}._expand_conv.weight" in weight_file) == (expand != 1)
            index += 1
    assert f"_blocks.{index}._depthwise_conv.weight" not in weight_file
    assert not any("_se_" in name for name in weight_file)  # Lite: no squeeze-excitation


@pytest.mark.parametrize(("size", "kernel", "stride", "expected"), [
    (224, 3, 2, (0, 1)), (225, 3, 2, (1, 1)), (112, 5, 2, (1, 2)), (28, 5, 1, (2, 2)), (14, 1, 1, (0, 0)),
])
def test_same_pad_puts_the_odd_pixel_after(size, kernel, stride, expected):
    assert same_pad(size, kernel, stride) == expected


def test_feature_taps_strides_and_channels(lite0):
    x = torch.zeros(2, 3, 64, 96)
    feats = lite0.features(x, taps=(2, 4, 8, 16, 32))
    for stride, tensor in feats.items():
        assert tensor.shape == (2, TAP_CHANNELS[stride], 64 // stride, 96 // stride)
    with pytest.raises(ValueError, match="valid strides"):
        lite0.features(x, taps=(3,))


def test_frozen_by_default(lite0):
    assert not any(p.requires_grad for p in lite0.parameters())
    lite0.train()
    assert not lite0.training


def test_grace_hopper_is_a_uniform(lite0):
    matplotlib_cbook = pytest.importorskip("matplotlib.cbook")
    path = matplotlib_cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    image = cv2.resize(image, (224, 224), interpolation=cv2.INTER_AREA)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
    mean = torch.tensor(INPUT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(INPUT_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = lite0((x - mean) / std)
    top5 = logits[0].topk(5).indices.tolist()
    assert 652 in top5  # military uniform (observed: top-1, p ~ 0.45)
    assert {834, 906, 457} & set(top5)  # suit / Windsor tie / bow tie


def test_missing_weight_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        efficientnet_lite0(tmp_path / "none.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(np.arange(100, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match="cannot read"):
        efficientnet_lite0(bad)


def test_torchvision_backbone_needs_local_weights(tmp_path):
    with pytest.raises(ValueError, match="valid are"):
        torchvision_backbone("resnet9000", None)
    with pytest.raises(BackboneUnavailable, match="never downloads"):
        torchvision_backbone("wide_resnet101_2", None)
    with pytest.raises(BackboneUnavailable, match="does not exist"):
        torchvision_backbone("vgg19", tmp_path / "missing.pth")


def test_torchvision_missing_is_a_clear_error(tmp_path):
    try:
        import torchvision  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("torchvision is installed: the missing-package path cannot be exercised")
    weights = tmp_path / "vgg19.pth"
    weights.write_bytes(b"not used")
    with pytest.raises(BackboneUnavailable, match="needs torchvision"):
        torchvision_backbone("vgg19", weights)
