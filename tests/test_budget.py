"""Training that fits the machine: --steps auto within --time-budget, early stopping on held-out images,
the progress bar's budget, and Ctrl-C / SIGTERM ending training with a checkpoint, a bundle and exit 130."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from trainer.fit import TrainConfig, fit, read_checkpoint
from trainer.models import create_model

TILE = 32


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 spinning OpenMP threads are far slower on the shared cores
    yield
    torch.set_num_threads(before)


def textures(n: int, seed: int = 0, size: int = 40) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    out = []
    for _ in range(n):
        base = 128 + 50 * np.sin(xx / 3 + rng.uniform(0, 6)) * np.cos(yy / 4) + rng.normal(0, 4, xx.shape)
        out.append(np.clip(base, 0, 255).astype(np.uint8)[:, :, None].repeat(3, axis=2))
    return out


def tiny_model():
    torch.manual_seed(0)
    return create_model("reconstruction", "s", latent=4)


def test_time_budget_ends_training_in_time():
    # no wall-time assertion (the shared machine's load varies): the loop must end for the budget
    config = TrainConfig(steps=1_000_000, time_budget=2.0, tile=TILE, lr=1e-3)
    result = fit(tiny_model(), textures(4), config)
    assert result["stopped"] == "budget" and 0 < result["steps"] < 1_000_000
    assert len(result["loss"]) == result["steps"] and result["seconds"] > 1.0  # most of the budget


def test_early_stopping_on_held_out_images_keeps_the_best_weights():
    config = TrainConfig(steps=500, tile=TILE, lr=1e-12, val_every=2, patience=2, val_crops=2)
    model = tiny_model()
    result = fit(model, textures(4), config, val_images=textures(2, seed=1))
    # lr ~0: the validation loss never improves by 1 %, so training stops after the first check + 2 more
    assert result["stopped"] == "early" and result["steps"] == 6
    checks = result["validation"]["checks"]
    assert [s for s, _ in checks] == [2, 4, 6] and result["validation"]["best_step"] == 2
    assert result["validation"]["best_loss"] == pytest.approx(checks[0][1])


def test_validation_improves_and_training_runs_its_steps():
    config = TrainConfig(steps=12, tile=TILE, lr=1e-3, val_every=4, val_crops=2)
    result = fit(tiny_model(), textures(4), config, val_images=textures(2, seed=1))
    assert result["stopped"] == "steps" and result["steps"] == 12
    assert [s for s, _ in result["validation"]["checks"]] == [4, 8, 12]


def test_stop_flag_ends_training_after_the_current_step_with_a_checkpoint(tmp_path):
    calls = []

    def stop() -> bool:
        calls.append(1)
        return len(calls) > 3

    path = tmp_path / "ckpt.pt"
    result = fit(tiny_model(), textures(4), TrainConfig(steps=100, tile=TILE, checkpoint_path=str(path)),
                 stop=stop)
    assert result["stopped"] == "interrupted" and result["steps"] == 3
    assert read_checkpoint(path)["step"] == 3


def test_invalid_budget_settings_are_refused():
    with pytest.raises(ValueError, match="time_budget"):
        TrainConfig(time_budget=-1)
    with pytest.raises(ValueError, match="patience"):
        TrainConfig(patience=0)


def test_progress_bar_shows_the_budget(capsys):
    from trainer.cli import ProgressBar

    bar = ProgressBar()
    bar(10, 100, {"loss": 0.5, "budget_s": 600.0, "elapsed_s": 90.0})
    bar(20, 120, {"loss": 0.4, "budget_s": 600.0, "elapsed_s": 150.0})
    bar.close()
    err = capsys.readouterr().err
    assert "budget 10 min" in err and "budget left=7:30" in err and "/120" in err


def test_steps_option_accepts_auto_or_a_count(capsys):
    from trainer.cli import build_parser, main

    parser = build_parser()
    assert parser.parse_args(["train", "--folder", "x", "--out", "y"]).steps == "auto"
    assert parser.parse_args(["train", "--folder", "x", "--out", "y", "--steps", "7"]).steps == 7
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--folder", "x", "--out", "y", "--steps", "many"])
    assert "auto" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--folder", "x", "--out", "y", "--time-budget", "0"])
    assert exit_info.value.code == 2
    assert "--time-budget: must be a number > 0" in capsys.readouterr().err


# ---------------------------------------------------------------- Ctrl-C / SIGTERM in a real process

def _folder(tmp_path: Path) -> Path:
    folder = tmp_path / "good"
    folder.mkdir()
    for i, image in enumerate(textures(8, size=48)):
        cv2.imwrite(str(folder / f"{i:02d}.png"), image)
    return folder


@pytest.mark.slow  # a subprocess importing torch, a tiny training, then calibration and export: ~15-60 s
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_training_writes_checkpoint_and_bundle_and_exits_130(tmp_path, sig):
    out = tmp_path / "bundle"
    argv = [sys.executable, "-m", "trainer", "train", "--folder", str(_folder(tmp_path)), "--kind",
            "reconstruction", "--tile", str(TILE), "--steps", "1000000", "--checkpoint-every", "1",
            "--val-fraction", "0.25", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint.pt").is_file():  # training has started: steps are being taken
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "training did not start within 120 s"
            time.sleep(0.2)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and signal.Signals(sig).name in stderr
    assert "interrupted after" in stderr
    state = read_checkpoint(out / "checkpoint.pt")
    training = json.loads((out / "bundle.json").read_text())["training"]
    assert training["stopped"] == "interrupted"
    assert 0 < training["steps"] == state["step"] < 1_000_000
    assert (out / "model.onnx").is_file() and (out / "metrics.json").is_file()
