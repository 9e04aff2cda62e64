"""edge-train: `train --config` (keys = option names, validated, the key named in errors, written back as
train.yaml), `evaluate --folder` on a labelled folder (the same metrics as MVTec), and the report without a
test set (no ROC panel, no warning, no `{}`)."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import yaml

from trainer import cli
from trainer.data.labelled import load_labelled_folder
from trainer.data.synthetic import write_mvtec_tree
from trainer.report import Panel, write_report


def _parse(argv):
    return cli.build_parser().parse_args(cli._expand_config(argv))


def test_config_keys_are_the_options(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump({"folder": "data/good", "kind": "dfr", "tile": 128, "steps": 300,
                                    "batch-size": 4, "option": {"taps": [2, 4], "pretrained": False},
                                    "cdo": True, "out": "runs/a"}))
    args = _parse(["train", "--config", str(path)])
    assert (args.folder, args.kind, args.tile, args.steps, args.batch_size, args.cdo, args.out) == \
        ("data/good", "dfr", 128, 300, 4, True, "runs/a")
    assert cli.parse_options(args.option) == {"taps": (2, 4), "pretrained": False}
    again = _parse(["train", "--config", str(path), "--steps", "5", "--out", "runs/b"])  # command line wins
    assert (again.steps, again.out, again.tile) == (5, "runs/b", 128)


@pytest.mark.parametrize("data, message", [
    ({"stepz": 3}, "stepz: unknown key"),
    ({"steps": 0}, "steps: must be an integer >= 1"),
    ({"tile": "big"}, "tile: must be an integer >= 1"),
    ({"kind": "magic"}, "kind: must be one of"),
    ({"cdo": "yes"}, "cdo: must be true or false"),
    ({"option": ["alpha"]}, "option: must be a mapping"),
    ({"frr": [0.1]}, "frr: must be a single value"),
    ([1, 2], "must be a mapping of option names"),
])
def test_config_errors_name_the_key(data, message, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    assert cli.main(["train", "--config", str(path), "--folder", "x", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edge-train train: error: ") and message in err[0], err
    assert not (tmp_path / "o").exists()


def test_train_yaml_round_trip(tmp_path):
    args = cli.build_parser().parse_args(["train", "--folder", "data/good", "--kind", "dfr", "--tile", "64",
                                          "--option", "taps=[2,4]", "--steps", "7", "--out", "runs/x"])
    cli.write_train_yaml(args, tmp_path / "train.yaml")
    text = (tmp_path / "train.yaml").read_text()
    assert text.startswith("# written by edge-train train") and "config" not in yaml.safe_load(text)
    assert "out" not in yaml.safe_load(text)  # training again needs its own --out
    again = _parse(["train", "--config", str(tmp_path / "train.yaml"), "--out", "runs/x"])
    keep = lambda a: {k: v for k, v in vars(a).items() if k not in ("config", "func", "option")}  # noqa: E731
    assert keep(again) == keep(args)
    assert cli.parse_options(again.option) == cli.parse_options(args.option)


# ---- evaluate --folder ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    root = tmp_path_factory.mktemp("mvtec")
    cat = write_mvtec_tree(root, "weave", size=48, n_train=4, n_test_good=3, n_test_defect=2, channels=1)
    folder = root / "mine"  # the same test images, in the labelled-folder layout
    shutil.copytree(cat / "test", folder)
    shutil.copytree(cat / "ground_truth", folder / "ground_truth")
    return root, folder


def test_labelled_folder_layout(labelled, tmp_path):
    _, folder = labelled
    splits = load_labelled_folder(folder)
    assert splits.test.groups.count("good") == 3 and splits.test.groups.count("spot") == 2
    assert splits.test.masks is not None and splits.val == []
    held = load_labelled_folder(folder, val_fraction=0.34)  # a checkpoint is calibrated on part of good/
    assert len(held.val) == 1 and held.test.groups.count("good") == 2
    empty = tmp_path / "e"
    (empty / "good").mkdir(parents=True)
    with pytest.raises(ValueError, match="no defect folder"):
        load_labelled_folder(empty)
    with pytest.raises(ValueError, match="no good/ folder"):
        load_labelled_folder(tmp_path)


def test_evaluate_folder_gives_the_mvtec_metrics(labelled, tiny_bundle, tmp_path, capsys):
    root, folder = labelled
    assert cli.main(["evaluate", "--bundle", str(tiny_bundle), "--folder", str(folder), "--out",
                     str(tmp_path / "f")]) == 0
    assert cli.main(["evaluate", "--bundle", str(tiny_bundle), "--mvtec", str(root), "--category", "weave",
                     "--out", str(tmp_path / "m")]) == 0
    capsys.readouterr()
    mine = json.loads((tmp_path / "f" / "metrics.json").read_text())
    mvtec = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert mine == mvtec and "pixel_auroc" in mine and "au_pro_0.3" in mine and mine["n_defect"] == 4
    shutil.rmtree(folder / "ground_truth")  # without masks: the image metrics only
    try:
        assert cli.main(["evaluate", "--bundle", str(tiny_bundle), "--folder", str(folder)]) == 0
        printed = json.loads(capsys.readouterr().out.split("\ndone")[0])
        assert printed["image_auroc"] == mine["image_auroc"] and "pixel_auroc" not in printed
    finally:
        shutil.copytree(root / "weave" / "ground_truth", folder / "ground_truth")


# ---- report and output without a test set ----------------------------------------------------------------


def test_report_without_test_set_has_no_roc_and_no_warning(tmp_path):
    panels = [Panel(np.zeros((16, 16, 1), np.uint8), np.ones((4, 4), np.float32), "validation 0")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's "No artists with labels" warning fails the test
        write_report(tmp_path / "r.png", {}, panels, title="no test set")
        fpr = np.linspace(0, 1, 5)
        write_report(tmp_path / "roc.png", {"image": (fpr, fpr, 0.5)}, panels, title="with a test set")
    import cv2

    without, with_roc = cv2.imread(str(tmp_path / "r.png")), cv2.imread(str(tmp_path / "roc.png"))
    assert without.shape[0] * 2 == with_roc.shape[0]  # the ROC row is there only with a test set


def test_no_empty_json_without_metrics(capsys):
    cli._print_metrics({"thresholds": {"image": 1.0}}, "runs/x")
    out = capsys.readouterr().out
    assert "{}" not in out and "no test set" in out and "edge-train evaluate --bundle runs/x --folder" in out


def test_option_lists_as_documented():
    """docs/model_kinds.md writes ``--option taps=8,16``: a comma list of numbers is a tuple; other strings
    with commas stay strings."""
    assert cli.parse_options(["taps=8,16", "name=a,b", "lr=1e-3", "flags=[1, 2]"]) == {
        "taps": (8, 16), "name": "a,b", "lr": 1e-3, "flags": (1, 2)}
