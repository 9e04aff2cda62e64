"""Model bundle: the directory a trainer writes and every engine reads.

A bundle holds
  model.onnx       full graph: uint8 NHWC tiles -> normalised anomaly map B x 1 x h x w (float32)
  core.pt2         torch.export program of the core network only (float NCHW normalised -> K raw maps),
                   used by the PyTorch backend, which runs pre/post-processing itself in FP32
  model.int8.onnx  optional (``files.onnx_int8``): model.onnx with the core's convolutions quantised to INT8
                   (QDQ, engines.quantize); pre/post-processing FP32. Its entry also holds "quantization",
                   how it was calibrated, and once checked "guard", the accuracy guard's verdict
                   (benchmarks/precision_guard.py --record). Bundles without it read as before.
  bundle.json      metadata (see BundleMeta); sha256 of every file listed in ``files``

Reading needs no torch and no onnx: the daemon's ONNX Runtime path stays light.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["BUNDLE_FORMAT", "BUNDLE_VERSION", "BundleError", "BundleMeta", "InputSpec", "MapSpec",
           "read_bundle", "write_bundle_json", "sha256_file", "carried_precisions", "verified_precisions",
           "onnx_file"]

BUNDLE_FORMAT = "edge-inspect-bundle"
BUNDLE_VERSION = 1
ONNX_FILE = "model.onnx"
TORCH_FILE = "core.pt2"
INT8_FILE = "model.int8.onnx"
ONNX_FILES = {"fp32": "onnx", "int8": "onnx_int8"}  # precision -> key in ``files``
META_FILE = "bundle.json"


class BundleError(ValueError):
    """A bundle directory is missing, malformed or does not match its checksums."""


@dataclass(frozen=True)
class InputSpec:
    height: int
    width: int
    channels: int  # channels the camera delivers per tile: 1 (mono) or 3 (RGB)
    mean: tuple[float, ...]  # per model channel, applied after scaling to [0, 1]
    std: tuple[float, ...]
    model_channels: int = 3  # channels the core network expects; mono input is replicated
    dtype: str = "uint8"
    layout: str = "NHWC"


@dataclass(frozen=True)
class MapSpec:
    """Output anomaly map geometry and the normalisation folded into the graph."""

    height: int
    width: int
    stride: int  # input pixels per map pixel
    q_a: tuple[float, ...]  # per raw map: value mapped to 0
    q_b: tuple[float, ...]  # per raw map: value mapped to 0.1
    weights: tuple[float, ...]  # combination weights of the normalised raw maps


@dataclass(frozen=True)
class BundleMeta:
    kind: str  # model kind: efficientad, dfr, ...
    size: str  # variant: s, m, ...
    input: InputSpec
    map: MapSpec
    image_threshold: float  # on the image score (max of the smoothed map)
    pixel_threshold: float  # segmentation threshold on map values
    target_false_reject_rate: float = 0.01
    training: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)  # how the thresholds were set (trainer/calibrate.py)
    versions: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)  # name -> {"path", "sha256"}
    format: str = BUNDLE_FORMAT
    format_version: int = BUNDLE_VERSION

    @property
    def model_id(self) -> str:
        digest = self.files.get("onnx", {}).get("sha256", "")[:12]
        return f"{self.kind}-{self.size}-{digest}" if digest else f"{self.kind}-{self.size}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _require(data: dict, key: str, where: str):
    if key not in data:
        raise BundleError(f"bundle.json: missing key '{where}{key}'")
    return data[key]


def _meta_from_dict(data: dict) -> BundleMeta:
    if data.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"bundle.json: format is {data.get('format')!r}, expected {BUNDLE_FORMAT!r}")
    if data.get("format_version") != BUNDLE_VERSION:
        raise BundleError(f"bundle.json: format_version {data.get('format_version')!r} is not supported "
                          f"(this build reads {BUNDLE_VERSION})")
    try:
        inp = _require(data, "input", "")
        mp = _require(data, "map", "")
        input_spec = InputSpec(**{**inp, "mean": tuple(inp["mean"]), "std": tuple(inp["std"])})
        map_spec = MapSpec(**{**mp, "q_a": tuple(mp["q_a"]), "q_b": tuple(mp["q_b"]),
                              "weights": tuple(mp["weights"])})
        rest = {k: v for k, v in data.items() if k not in ("input", "map")}
        return BundleMeta(input=input_spec, map=map_spec, **rest)
    except TypeError as exc:
        raise BundleError(f"bundle.json: unexpected or missing field: {exc}") from exc
    except KeyError as exc:
        raise BundleError(f"bundle.json: missing field {exc}") from exc


def read_bundle(bundle_dir: str | Path, verify: bool = True) -> BundleMeta:
    """Read and validate bundle.json; with verify, check every listed file's sha256."""
    bundle_dir = Path(bundle_dir)
    meta_path = bundle_dir / META_FILE
    if not bundle_dir.is_dir():
        raise BundleError(f"bundle directory {bundle_dir} does not exist")
    if not meta_path.is_file():
        raise BundleError(f"{meta_path} is missing: not a model bundle")
    try:
        data = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{meta_path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BundleError(f"{meta_path} must hold a JSON object")
    meta = _meta_from_dict(data)
    if "onnx" not in meta.files:
        raise BundleError(f"{meta_path}: files.onnx is missing")
    if verify:
        for name, entry in meta.files.items():
            path = bundle_dir / entry["path"]
            if not path.is_file():
                raise BundleError(f"bundle file {path} ({name}) is missing")
            actual = sha256_file(path)
            if actual != entry["sha256"]:
                raise BundleError(f"bundle file {path} ({name}) has sha256 {actual[:16]}..., bundle.json "
                                  f"says {entry['sha256'][:16]}...: the bundle is corrupt or edited")
    return meta


def carried_precisions(meta: BundleMeta) -> frozenset[str]:
    """The ONNX graph precisions a bundle carries: fp32 always, int8 when files.onnx_int8 is listed."""
    return frozenset(p for p, key in ONNX_FILES.items() if key in meta.files)


def verified_precisions(meta: BundleMeta) -> frozenset[str]:
    """What ``precision="auto"`` may pick: fp32, and int8 once benchmarks/precision_guard.py --record wrote a
    passed guard into files.onnx_int8.guard (re-quantising writes a new entry without one)."""
    guard = meta.files.get("onnx_int8", {}).get("guard", {})
    return frozenset({"fp32", "int8"} if guard.get("ok") is True else {"fp32"})


def onnx_file(bundle_dir: str | Path, meta: BundleMeta, precision: str = "fp32") -> Path:
    """Path of the ONNX graph of ``precision`` (fp32 or int8); BundleError when the bundle lacks it."""
    key = ONNX_FILES.get(precision)
    if key is None or key not in meta.files:
        raise BundleError(f"bundle {bundle_dir} carries no {precision} ONNX graph (files: "
                          f"{', '.join(sorted(meta.files))})")
    return Path(bundle_dir) / meta.files[key]["path"]


def write_bundle_json(bundle_dir: str | Path, meta: BundleMeta) -> Path:
    """Write bundle.json after computing the sha256 of the files the meta lists (other entry keys kept)."""
    bundle_dir = Path(bundle_dir)
    files = {name: {**entry, "path": entry["path"], "sha256": sha256_file(bundle_dir / entry["path"])}
             for name, entry in meta.files.items()}
    data = json.loads(meta.to_json())
    data["files"] = files
    path = bundle_dir / META_FILE
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path
