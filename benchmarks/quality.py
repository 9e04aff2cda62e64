"""The quality table (docs/quality.md): every model kind at its CPU default budget on ELPV mono and poly and
on the real-texture MVTec-layout set; JSON (resumable) + markdown.

    python benchmarks/quality.py --out runs/quality                       # every kind, every data set
    python benchmarks/quality.py --out runs/quality --kinds patchcore --datasets elpv-mono elpv-poly

Each row is one `edge-train train` run at its defaults (``--steps auto``: the time budget, early stopping on
the held-out good images; PatchCore: the memory bank, cross-fitted calibration), trained on the training
split, calibrated on good images it never trained on, and measured on the held-out test images it never saw:
image AUROC, the false-reject and miss rates at the calibrated threshold (target 1 %), the FAILs that carry
a region, and, as a ranking diagnostic, the miss rate at a 2 % false-reject rate read off the test set
itself. ELPV cells are resized to 256 x 256 (one tile per cell, as in docs/trainer.md); texture images are
128 x 128. The held-out false-reject goal is max(3 x target, target + 2 / n_good_test). Rows already in
<out>/results.json are kept (delete the file, or a row's entry, to run it again).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

KINDS = ("patchcore", "efficientad", "dfr", "reconstruction", "mkd", "tsdn", "saliency")
DATASETS = ("elpv-mono", "elpv-poly", "brick", "grass", "gravel")
TARGET_FRR = 0.01


def build_parser() -> argparse.ArgumentParser:
    from engines.cli_common import Parser

    p = Parser(prog="benchmarks/quality.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for bundles, results.json and results.md")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS), help="model kinds")
    p.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS), help="data sets")
    p.add_argument("--time-budget", type=float, default=None,
                   help="minutes per training with --steps auto; default: edge-train's (10 on CPU)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--seed", type=int, default=0, help="split and training seed")
    p.add_argument("--limit", type=int, default=None, help="ELPV cells per type (smoke runs only)")
    p.add_argument("--elpv-size", type=int, default=256, help="ELPV cells resized to N x N, one tile")
    p.add_argument("--texture-train", type=int, default=120, help="texture training images per category")
    return p


def machine() -> dict:
    model = "unknown"
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown":
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = [f for f in ("amx_tile", "avx512_bf16", "avx512_vnni", "avx512f", "avx2") if f in flags]
    return {"cpu": model, "isa": isa, "cores": os.cpu_count(), "python": platform.python_version(),
            "load_before": os.getloadavg()[0]}


def _data_args(dataset: str, out: Path, args) -> list[str]:
    if dataset.startswith("elpv-"):
        size = str(args.elpv_size)
        data = ["--elpv", dataset.split("-", 1)[1], "--resize", size, "--tile", size]
        return data + (["--limit", str(args.limit)] if args.limit else [])
    from trainer.data.textures import write_texture_tree

    root = out / "textures"
    if not (root / dataset / "validation" / "good").is_dir():  # older trees had no validation band
        write_texture_tree(root, dataset, n_train=args.texture_train, seed=args.seed)
    return ["--mvtec", str(root), "--category", dataset, "--tile", "128"]


def run_one(kind: str, dataset: str, out: Path, args) -> dict:
    from trainer.cli import build_parser as trainer_parser
    from trainer.cli import train_bundle

    bundle = out / "bundles" / f"{kind}-{dataset}"
    argv = ["train", "--kind", kind, "--seed", str(args.seed), "--out", str(bundle),
            *_data_args(dataset, out, args)]
    if args.time_budget is not None:
        argv += ["--time-budget", str(args.time_budget)]
    started = time.perf_counter()
    metrics = train_bundle(trainer_parser().parse_args(argv), progress=False)
    wall = time.perf_counter() - started
    n_good = int(metrics.get("n_good", 0))
    goal = max(3 * TARGET_FRR, TARGET_FRR + 2 / n_good) if n_good else None
    cal = metrics.get("calibration", {})
    keys = ("image_auroc", "false_reject_rate", "miss_rate", "oracle_miss_at_frr_0.02", "fails",
            "fails_with_regions", "n_good", "n_defect", "pixel_auroc", "au_pro_0.3", "per_group_auroc")
    return {"kind": kind, "dataset": dataset, "command": "edge-train " + " ".join(argv), **{
        k: metrics.get(k) for k in keys}, "frr_goal": goal,
        "frr_ok": None if goal is None else bool(metrics.get("false_reject_rate", 1.0) <= goal),
        "threshold_estimator": cal.get("image_threshold", {}).get("estimator"),
        "calibration_images": cal.get("n_good"), "training": metrics.get("training", {}),
        "wall_s": round(wall, 1)}


def _fmt(v, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def markdown(rows: list[dict], info: dict) -> str:
    head = ["kind", "data", "image AUROC", "false reject (goal)", "miss", "miss @ 2 % FRR (oracle)",
            "pixel AUROC", "AU-PRO 0.3", "FAILs with regions", "calibration", "training", "wall s"]
    lines = [f"Machine: {info['cpu']} ({', '.join(info['isa'])}), {info['cores']} cores, Python "
             f"{info['python']}; load average {info['load_before']:.2f} at the start.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        t = r.get("training", {})
        train = (f"{t.get('steps')} steps, {t.get('stopped')}" if t.get("steps") else
                 f"bank of {t.get('n_train')} images" if r["kind"] == "patchcore" else "zero-shot")
        cells = [r["kind"], r["dataset"], _fmt(r["image_auroc"]),
                 f"{_fmt(r['false_reject_rate'])} ({_fmt(r['frr_goal'])})", _fmt(r["miss_rate"]),
                 _fmt(r["oracle_miss_at_frr_0.02"]), _fmt(r.get("pixel_auroc")), _fmt(r.get("au_pro_0.3")),
                 f"{r['fails_with_regions']}/{r['fails']}",
                 f"{r['threshold_estimator']}, {r['calibration_images']} good", train, _fmt(r["wall_s"], 0)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def apply_quick(args) -> None:
    """EDGE_INSPECT_QUICK=1 (README, CI): PatchCore on 40 ELPV mono cells; the figures then mean nothing."""
    from engines.cli_common import quick_mode, quick_note

    if not quick_mode():
        return
    args.kinds, args.datasets, args.limit = ["patchcore"], ["elpv-mono"], min(args.limit or 40, 40)
    args.elpv_size = min(args.elpv_size, 128)
    quick_note("benchmarks/quality.py", f"quick run, figures mean nothing: --kinds patchcore --datasets "
                                        f"elpv-mono --limit {args.limit} --elpv-size {args.elpv_size}")


def main(argv: list[str] | None = None) -> int:
    from engines.cli_common import run_cli

    args = build_parser().parse_args(argv)
    apply_quick(args)
    return run_cli("benchmarks/quality.py", lambda: table(args))


def table(args) -> int:
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    state = json.loads(path.read_text()) if path.is_file() else {"machine": machine(), "rows": []}
    done = {(r["kind"], r["dataset"]) for r in state["rows"]}
    for dataset in args.datasets:
        for kind in args.kinds:
            if (kind, dataset) in done:
                continue
            print(f"== {kind} on {dataset}", flush=True)
            row = run_one(kind, dataset, out, args)
            state["rows"].append(row)
            path.write_text(json.dumps(state, indent=2, default=float) + "\n")
            print(json.dumps({k: row[k] for k in ("image_auroc", "false_reject_rate", "miss_rate",
                                                   "fails_with_regions", "fails", "wall_s")}), flush=True)
    (out / "results.md").write_text(markdown(state["rows"], state["machine"]))
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
