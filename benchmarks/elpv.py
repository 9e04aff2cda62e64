"""ELPV benchmark: train and evaluate anomaly models on ELPV mono and poly cells; JSON + markdown table.

    python benchmarks/elpv.py --out runs/elpv                     # CPU default: 10 min training per model
    python benchmarks/elpv.py --steps 20 --limit 200 --out /tmp/elpv-smoke   # smoke test

Each (model, cell type) runs the `edge-train train` pipeline (trainer.cli.train_bundle): the documented split
of trainer/data/elpv.py, calibration on validation good cells, evaluation on whole 300 x 300 test cells
(good vs probability-1 cells; probability 1/3 and 2/3 reported separately), bundle export. Every bundle lands
in <out>/<model>-<type>/. Figures are whatever the run measured; nothing is filled in by hand.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

MODELS = {"dfr-s": ("dfr", "s"), "efficientad-s": ("efficientad", "s"), "efficientad-m": ("efficientad", "m"),
          # the methods our work grew from (docs/model_kinds.md); saliency is zero-shot: --steps is ignored
          "reconstruction-s": ("reconstruction", "s"), "mkd-s": ("mkd", "s"), "tsdn-s": ("tsdn", "s"),
          "saliency-s": ("saliency", "s")}
COLUMNS = ("image_auroc", "image_f1_max", "false_reject_rate", "miss_rate")


def build_parser() -> argparse.ArgumentParser:
    from engines.cli_common import Parser

    p = Parser(prog="benchmarks/elpv.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["dfr-s", "efficientad-s"],
                   help="models to run (default dfr-s efficientad-s; add efficientad-m if time allows)")
    p.add_argument("--types", nargs="+", choices=("mono", "poly"), default=["mono", "poly"],
                   help="cell types")
    p.add_argument("--steps", default="auto", help="training steps per model, or auto (default): as many "
                                                   "as fit --time-budget, with early stopping")
    p.add_argument("--time-budget", type=float, metavar="MIN", help="minutes per model with --steps auto "
                                                                    "(edge-train's default: 10 on CPU)")
    p.add_argument("--teacher-steps", type=int, default=0,
                   help="EfficientAD: per-product teacher distillation steps first (default 0)")
    p.add_argument("--teacher", default="shipped", metavar="shipped|none|FILE",
                   help="EfficientAD teacher (default: the shipped one of the model's size)")
    p.add_argument("--tile", type=int, default=256, help="training crop size (default 256)")
    p.add_argument("--resize", type=int, metavar="N",
                   help="resize cells to N x N (256: one tile per cell)")
    p.add_argument("--seed", type=int, default=0, help="split and training seed")
    p.add_argument("--limit", type=int, help="cells per type (quick runs)")
    p.add_argument("--batch-size", type=int, default=1, help="training batch size")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for bundles and results")
    return p


def _train_args(args, kind: str, size: str, cell_type: str, out: Path) -> argparse.Namespace:
    from trainer.cli import build_parser as trainer_parser

    argv = ["train", "--elpv", cell_type, "--kind", kind, "--size", size, "--tile", str(args.tile),
            "--steps", str(args.steps), "--seed", str(args.seed), "--batch-size", str(args.batch_size),
            "--teacher-steps", str(args.teacher_steps), "--teacher", args.teacher, "--out", str(out)]
    if args.limit:
        argv += ["--limit", str(args.limit)]
    if args.resize:
        argv += ["--resize", str(args.resize)]
    if args.time_budget is not None:
        argv += ["--time-budget", str(args.time_budget)]
    return trainer_parser().parse_args(argv)


def _markdown(rows: list[dict]) -> str:
    head = ["model", "type", *COLUMNS, "auroc prob 0.67", "auroc prob 0.33", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        m = r["metrics"]
        groups = m.get("per_group_auroc", {})
        cells = [r["model"], r["type"], *(f"{m[c]:.3f}" if c in m else "-" for c in COLUMNS),
                 *(f"{groups[g]:.3f}" if g in groups else "-" for g in ("prob_0.67", "prob_0.33")),
                 f"{r['train_seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run(args) -> list[dict]:
    from trainer.cli import train_bundle

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for cell_type in args.types:
        for name in args.models:
            kind, size = MODELS[name]
            started = time.perf_counter()
            metrics = train_bundle(_train_args(args, kind, size, cell_type, out / f"{name}-{cell_type}"))
            rows.append({"model": name, "type": cell_type, "metrics": metrics,
                         "train_seconds": metrics["training"]["seconds"],
                         "total_seconds": round(time.perf_counter() - started, 1)})
            print(f"{name} {cell_type}: image AUROC {metrics['image_auroc']:.3f} "
                  f"({rows[-1]['total_seconds']:.0f} s)", file=sys.stderr)
            settings = dict(vars(args))
            (out / "results.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2,
                                                         default=float) + "\n")
            (out / "results.md").write_text(_markdown(rows))
    return rows


def apply_quick(args) -> None:
    """EDGE_INSPECT_QUICK=1 (README, CI): a few steps on a few mono cells; the figures then mean nothing."""
    from engines.cli_common import quick_mode, quick_note

    if not quick_mode():
        return
    args.steps = "20" if args.steps == "auto" else str(min(int(args.steps), 20))
    args.teacher_steps = min(args.teacher_steps, 20)
    args.limit, args.types, args.models = min(args.limit or 40, 40), args.types[:1], args.models[:1]
    args.tile, args.resize = min(args.tile, 64), min(args.resize or 128, 128)
    quick_note("benchmarks/elpv.py",
               f"quick run, figures mean nothing: --steps {args.steps} --teacher-steps {args.teacher_steps} "
               f"--limit {args.limit} --resize {args.resize} --tile {args.tile} --types {args.types[0]} "
               f"--models {args.models[0]}")


def main(argv: list[str] | None = None) -> int:
    from engines.cli_common import run_cli

    args = build_parser().parse_args(argv)
    apply_quick(args)

    def job() -> int:
        print(_markdown(run(args)))
        return 0

    return run_cli("benchmarks/elpv.py", job)


if __name__ == "__main__":
    sys.exit(main())
