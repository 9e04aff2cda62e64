"""Config: the shipped YAML files parse; errors name the key and the problem."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from edge_daemon.config import ConfigError, camera_inspection_mapping, config_from_mapping, load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _base(**over) -> dict:
    data = {"engine": {"bundle": "/b"}}
    data.update(over)
    return data


def test_shipped_configs_parse():
    example = load_config(CONFIGS / "example.yaml")
    assert example.workers == 1 and example.queue.drop_policy == "drop-oldest"
    demo = load_config(CONFIGS / "demo.yaml", bundle="/elsewhere/bundle")
    assert demo.engine.bundle == "/elsewhere/bundle" and demo.engine.backend == "onnxruntime"
    assert load_config(CONFIGS / "demo.yaml").engine.bundle.endswith("runs/demo/bundle")


def test_round_trip_through_mapping():
    cfg = load_config(CONFIGS / "demo.yaml")
    assert config_from_mapping(cfg.to_mapping()) == cfg


@pytest.mark.parametrize(
    "data, message",
    [
        (_base(workers={"count": 0}), "workers.count: must be >= 1, got 0"),
        (_base(workers=0), "workers.count: must be >= 1, got 0"),
        ({"engine": {}}, "engine.bundle: is required"),
        (_base(engine={"bundle": "/b", "backend": "cuda"}), "engine.backend: must be one of"),
        (_base(engine={"bundle": "/b", "max_batch": "8"}), "engine.max_batch: must be an integer"),
        (_base(engine={"bundle": "/b", "precision": "int4"}), "engine.precision"),
        (_base(queue={"slots": 4, "size": 8}), "queue.slots: must be > queue.size"),
        (_base(queue={"drop_policy": "random"}), "queue.drop_policy: must be one of"),
        (_base(endpoints={"ingest": "localhost:5555"}), "endpoints.ingest: must be a ZeroMQ endpoint"),
        (_base(endpoints={"metrics_port": 70000}), "endpoints.metrics_port: must be <= 65535"),
        (_base(max_frame={"channels": 2}), "max_frame.channels: must be 1 or 3"),
        (_base(cameras=[{"id": "a"}, {"id": "a"}]), "cameras[1].id: duplicate camera id"),
        (_base(cameras=[{"id": "a", "roi": [0, 0, 0, 5]}]), "cameras[0].roi: needs x, y >= 0 and w, h > 0"),
        (_base(cameras=[{"id": "a", "ignore": [[1, 2, 3]]}]), "cameras[0].ignore[0]: must be [x, y, w, h]"),
        (_base(bogus=1), "bogus: unknown key"),
        (_base(endpoints={"ingets": "tcp://*:1"}), "endpoints.ingets: unknown key"),
        (_base(curve={"server_secret": "/nope", "clients_dir": "/"}), "curve.server_secret: file /nope"),
        (_base(instance="a b"), "instance: must be"),
        ([1, 2], "must be a mapping at the top level"),
    ],
)
def test_errors_name_the_key(data, message):
    with pytest.raises(ConfigError) as info:
        config_from_mapping(data)
    assert message in str(info.value)


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("engine: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_relative_paths_mean_the_current_directory(tmp_path, monkeypatch):
    """engine.bundle in the file and --bundle: both relative to where the command runs, not to the file."""
    (tmp_path / "configs").mkdir()
    rel = tmp_path / "configs" / "rel.yaml"
    rel.write_text(yaml.safe_dump({"engine": {"bundle": "runs/x"}}))
    monkeypatch.chdir(tmp_path)
    assert load_config("configs/rel.yaml").engine.bundle == str(tmp_path / "runs/x")
    assert load_config("configs/rel.yaml", bundle="runs/y").engine.bundle == str(tmp_path / "runs/y")
    assert load_config(rel, bundle="/abs/b").engine.bundle == "/abs/b"


def test_camera_overrides_reach_inspection_config():
    from edge_daemon.worker import inspect_configs

    cfg = config_from_mapping(
        _base(
            inspection={"tile_overlap": 8},
            cameras=[{"id": "a", "threshold": 0.7, "roi": [0, 0, 64, 64], "ignore": [[1, 1, 4, 4]]}],
        )
    )
    mapping = camera_inspection_mapping(cfg, "a")
    assert mapping == {
        "tile_overlap": 8,
        "image_threshold": 0.7,
        "roi": [0, 0, 64, 64],
        "ignore_zones": [[1, 1, 4, 4]],
    }
    configs = inspect_configs(cfg)
    assert configs["a"].image_threshold == 0.7 and configs["a"].roi == (0, 0, 64, 64)
    assert configs[None].image_threshold is None and configs[None].tile_overlap == 8


def test_bundle_scoring_is_the_default_the_config_overrides():
    """A threshold holds only with the scoring it was calibrated with: the bundle's record is the default."""
    from types import SimpleNamespace

    from edge_daemon.worker import inspect_configs

    meta = SimpleNamespace(calibration={"scoring": {"tile_overlap": 12, "score": "topk", "topk": 40,
                                                    "smoothing_sigma": 2.0, "unrelated": 1}})
    cfg = config_from_mapping(_base(inspection={"smoothing_sigma": 0.5}, cameras=[{"id": "a"}]))
    configs = inspect_configs(cfg, meta)
    for config in configs.values():
        assert (config.tile_overlap, config.score, config.topk) == (12, "topk", 40)
        assert config.smoothing_sigma == 0.5  # set in the config: the config wins
    assert inspect_configs(cfg)[None].score == "max"  # no bundle: the pipeline's defaults


def test_check_config_cli(tmp_path, tiny_bundle, capsys):
    from edge_daemon.cli import main

    assert main(["check-config", str(CONFIGS / "demo.yaml"), "--bundle", str(tiny_bundle)]) == 0
    assert "ok:" in capsys.readouterr().out
    assert main(["check-config", str(CONFIGS / "demo.yaml"), "--bundle", str(tmp_path)]) == 2
    assert "bundle.json is missing" in capsys.readouterr().err


@pytest.mark.parametrize("backend, precision", [
    ("openvino", "bf16"), ("openvino", "int8"), ("onnxruntime", "int8"), ("auto", "auto"), ("openvino", None),
])
def test_cpu_backends_and_precisions_accepted(backend, precision):
    cfg = config_from_mapping(_base(engine={"bundle": "/b", "backend": backend, "precision": precision}))
    assert (cfg.engine.backend, cfg.engine.precision) == (backend, precision)
