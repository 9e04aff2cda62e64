"""Accuracy guard of the reduced CPU precisions: each engine's image scores against FP32 on labelled images.

    python benchmarks/precision_guard.py --bundle runs/elpv/efficientad-s-mono --elpv mono --threads 2
    python benchmarks/precision_guard.py --bundle B --mvtec DIR --category bottle --json guard.json

The test images run through the bundle on overlapping tiles exactly as ``edge-train evaluate --bundle`` does
(trainer.scoring.score_images: the daemon's tiling, fusion and image score). The reference is ONNX Runtime
FP32; each other engine (default: onnxruntime:int8, openvino:fp32, openvino:bf16, openvino:int8) gets one row:
Spearman of its image scores against FP32, image AUROC and its change, verdict flips at the bundle's image
threshold (pass -> fail, fail -> pass, over every test image), and ``ok`` = Spearman >= 0.99 and
|AUROC change| <= 0.005. An engine this machine cannot run gets a row saying why. ELPV and MVTec splits are
those of the bundle's config.json (the training run) unless --seed/--limit/--resize say otherwise, so the
test images are the held-out ones. The CPU model and ISA features head the table. Quality only, no timing.
With --record the int8 rows' verdict is written into the bundle (files.onnx_int8.guard); ``precision: auto``
picks int8 only from a bundle whose INT8 graph passed.
The same functions back tests/test_precision_guard.py (a tiny model trained in seconds on synthetic data).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

__all__ = ["MIN_SPEARMAN", "MAX_AUROC_DELTA", "DEFAULT_ENGINES", "spearman", "guard_row", "engine_scores",
           "run_guard", "record_guard", "markdown", "main"]

MIN_SPEARMAN = 0.99
MAX_AUROC_DELTA = 0.005
REFERENCE = "onnxruntime:fp32"
DEFAULT_ENGINES = ("onnxruntime:int8", "openvino:fp32", "openvino:bf16", "openvino:int8")


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing their average rank."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
    return ranks


def spearman(a, b) -> float:
    """Spearman rank correlation (ties averaged); 1.0 when both are constant and equal, NaN when one is."""
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape or a.size < 2:
        raise ValueError(f"spearman needs two equal-length series of >= 2 values, got {a.size} and {b.size}")
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = np.sqrt((ra ** 2).sum() * (rb ** 2).sum())
    if denom == 0:
        return 1.0 if np.array_equal(a, b) else float("nan")
    return float((ra * rb).sum() / denom)


def guard_row(ref: np.ndarray, scores: np.ndarray, labels: np.ndarray, headline: np.ndarray,
              threshold: float) -> dict:
    """Pure: one engine's image scores against the FP32 reference's -> the guard figures."""
    from trainer.metrics import image_auroc

    ref, scores = np.asarray(ref, np.float64), np.asarray(scores, np.float64)
    auroc_ref = image_auroc(ref[headline], labels[headline])
    auroc = image_auroc(scores[headline], labels[headline])
    ref_fail, fail = ref >= threshold, scores >= threshold
    rho = spearman(ref, scores)
    row = {"spearman": rho, "auroc_fp32": auroc_ref, "auroc": auroc, "auroc_delta": auroc - auroc_ref,
           "flips": int((ref_fail != fail).sum()), "pass_to_fail": int((~ref_fail & fail).sum()),
           "fail_to_pass": int((ref_fail & ~fail).sum()), "images": int(len(ref)),
           "max_abs_score_delta": float(np.abs(scores - ref).max())}
    row["ok"] = bool(rho >= MIN_SPEARMAN and abs(row["auroc_delta"]) <= MAX_AUROC_DELTA)
    return row


def engine_scores(bundle: str | Path, spec: str, images: list[np.ndarray], threads: int | None = None,
                  batch: int = 8) -> tuple[np.ndarray, str]:
    """Image scores of ``images`` through engine ``spec`` (backend:precision): (scores, engine name)."""
    from engines import open_engine
    from trainer.scoring import score_images

    backend, _, precision = spec.partition(":")
    engine = open_engine(bundle, backend=backend, precision=precision or None, streams=1, max_batch=batch,
                         threads=threads)
    try:
        scores = score_images(engine, images).scores  # the daemon's tiling, fusion and score
    finally:
        engine.close()
    return scores, f"{engine.backend}/{engine.precision}"


def run_guard(bundle: str | Path, test, engines=DEFAULT_ENGINES, threads: int | None = None) -> list[dict]:
    """Guard rows for ``engines`` on the EvalSet ``test``; the first row is the FP32 reference itself."""
    from engines import BackendUnavailable, BundleError, read_bundle

    threshold = read_bundle(bundle).image_threshold
    labels = np.asarray(test.labels)
    headline = ~np.isin(np.array(test.groups), test.separate_groups)
    ref, ref_name = engine_scores(bundle, REFERENCE, test.images, threads)
    rows = [{"spec": REFERENCE, "engine": ref_name, **guard_row(ref, ref, labels, headline, threshold)}]
    for spec in engines:
        try:
            scores, name = engine_scores(bundle, spec, test.images, threads)
        except (BackendUnavailable, BundleError) as exc:
            rows.append({"spec": spec, "unavailable": str(exc)})
            continue
        rows.append({"spec": spec, "engine": name, **guard_row(ref, scores, labels, headline, threshold)})
    return rows


def markdown(rows: list[dict], cpu: str, title: str) -> str:
    lines = [f"{title}", f"CPU: {cpu}", "",
             "| precision | Spearman vs FP32 | image AUROC | AUROC change | verdict flips (pass->fail / "
             "fail->pass) | ok |", "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        if "unavailable" in r:
            lines.append(f"| {r['spec']} | - | - | - | - | not run: {r['unavailable']} |")
            continue
        lines.append(f"| {r['engine']} | {r['spearman']:.4f} | {r['auroc']:.4f} | {r['auroc_delta']:+.4f} | "
                     f"{r['flips']} of {r['images']} ({r['pass_to_fail']} / {r['fail_to_pass']}) | "
                     f"{'yes' if r['ok'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def record_guard(bundle: str | Path, rows: list[dict], data: str, cpu: str) -> dict | None:
    """Write the INT8 rows' verdict into bundle.json (files.onnx_int8.guard); None when no int8 row ran."""
    from dataclasses import replace

    from engines.bundle import read_bundle, write_bundle_json

    int8 = [r for r in rows if r["spec"].endswith(":int8") and "unavailable" not in r]
    meta = read_bundle(bundle)
    if not int8 or "onnx_int8" not in meta.files:
        return None
    keys = ("spec", "spearman", "auroc_fp32", "auroc_delta", "flips", "images", "ok")
    guard = {"ok": all(r["ok"] for r in int8), "data": data, "cpu": cpu,
             "min_spearman": MIN_SPEARMAN, "max_auroc_delta": MAX_AUROC_DELTA,
             "rows": [{k: r[k] for k in keys} for r in int8]}
    files = {**meta.files, "onnx_int8": {**meta.files["onnx_int8"], "guard": guard}}
    write_bundle_json(bundle, replace(meta, files=files))
    return guard


def _split_args(args) -> argparse.Namespace:
    """trainer.cli.load_data arguments: the bundle's own split (config.json) unless given on the command
    line."""
    config = Path(args.bundle) / "config.json"
    data = json.loads(config.read_text()).get("data", {}) if config.is_file() else {}
    same = data.get("source") == ("elpv" if args.elpv else "mvtec")

    def pick(name, key):
        given = getattr(args, name)
        return given if given is not None else (data.get(key) if same else None)

    return argparse.Namespace(mvtec=args.mvtec, folder=None, elpv=args.elpv, category=args.category,
                              resize=pick("resize", "resize_to"),
                              val_fraction=pick("val_fraction", "val_fraction"), limit=pick("limit", "limit"),
                              seed=pick("seed", "seed") or 0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmarks/precision_guard.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True, help="bundle folder (with model.int8.onnx for the int8 rows)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--elpv", choices=("mono", "poly"), help="ELPV test cells of this type")
    src.add_argument("--mvtec", metavar="DIR", help="MVTec-AD root folder (with --category)")
    p.add_argument("--category", help="MVTec category")
    p.add_argument("--limit", type=int, default=None, help="images loaded (default: as in training)")
    p.add_argument("--seed", type=int, default=None, help="split seed (default: as in training)")
    p.add_argument("--resize", type=int, default=None, help="resize images to N x N (default: as trained)")
    p.add_argument("--val-fraction", type=float, default=None, help="validation share (default: as trained)")
    p.add_argument("--engines", default=",".join(DEFAULT_ENGINES),
                   help=f"comma-separated backend:precision compared with {REFERENCE} "
                        f"(default {','.join(DEFAULT_ENGINES)})")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per engine (default: all cores)")
    p.add_argument("--json", default=None, help="write the rows and the CPU here")
    p.add_argument("--record", action="store_true",
                   help="write the int8 rows' verdict into the bundle (files.onnx_int8.guard): precision "
                        "auto picks int8 only when it passed")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from engines.cpuinfo import read_cpuinfo
    from trainer.cli import load_data

    splits = load_data(_split_args(args))
    if splits.test is None:
        print(f"precision_guard: {splits.name} has no labelled test images", file=sys.stderr)
        return 2
    rows = run_guard(args.bundle, splits.test, [e for e in args.engines.split(",") if e], args.threads)
    cpu = read_cpuinfo()
    print(markdown(rows, cpu.summary(), f"Precision guard: {args.bundle} on {splits.name} "
                                        f"({len(splits.test.images)} test images)"))
    if args.record:
        guard = record_guard(args.bundle, rows, splits.name, cpu.summary())
        print("recorded in bundle.json: " + ("no int8 row ran" if guard is None else
                                             f"int8 guard {'passed' if guard['ok'] else 'FAILED'}"))
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": {"model": cpu.model, "isa": list(cpu.isa)},
                                               "bundle": str(args.bundle), "data": splits.name, "rows": rows},
                                              indent=2, default=float) + "\n")
    return 0 if all(r.get("ok", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
