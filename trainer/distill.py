"""Distil the shipped EfficientAD teachers: ``python -m trainer.distill --size s`` (`distill` extra).

Reads the image collection (trainer.data.collection: sample images of scikit-image, scikit-learn and
matplotlib plus procedural textures), distils Lite0 features into the PDN teacher (trainer.teacher), and
writes trainer/assets/teacher-<size>.pt, its entry in trainer/assets/teachers.json (sha256, command,
settings, data, losses) and the loss curve docs/teacher-<size>-loss.png. Every 100 steps the teacher so far
is saved to --work (runs/, gitignored). docs/teacher.md has the commands that made the shipped files.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .data.collection import SOURCES, TEXTURE_KINDS, collection_images
from .models.backbones.torchvision_ import IMAGENET_MEAN, IMAGENET_STD
from .models.efficientad import PDN_BUILDERS, TEACHER_CHANNELS
from .teacher import ASSETS_DIR, DistillConfig, distill_teacher, save_teacher

__all__ = ["main", "build_parser", "plot_curve"]

DOCS_DIR = Path(__file__).resolve().parent.parent / "docs"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer.distill", description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(PDN_BUILDERS), required=True, help="EfficientAD size")
    p.add_argument("--steps", type=int, default=1000, help="distillation steps (1000)")
    p.add_argument("--batch-size", type=int, default=8, help="views per step (8)")
    p.add_argument("--crop", type=int, default=64, help="PDN input side; outputs crop/4-8 per side (64)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate, cosine decay (1e-3)")
    p.add_argument("--textures", type=int, default=60, help="procedural textures (60)")
    p.add_argument("--seed", type=int, default=0, help="seed (0)")
    p.add_argument("--half", action="store_true", help="store the weights as fp16 (loaded as fp32)")
    p.add_argument("--time-budget", type=float, default=0.0,
                   help="minutes: after 50 steps, cut --steps to what fits (0: no budget)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default cpu)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: 2 spinning threads are far slower on shared cores)")
    p.add_argument("--assets", default=str(ASSETS_DIR), help="where the teacher file and teachers.json go")
    p.add_argument("--docs", default=str(DOCS_DIR), help="where the loss curve goes")
    p.add_argument("--work", default="runs/distill", help="partial teachers every 100 steps")
    return p


def plot_curve(loss: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.arange(1, len(loss) + 1)
    window = max(1, len(loss) // 50)
    smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, loss, lw=0.5, alpha=0.4, label="per step")
    ax.plot(steps[window - 1:], smooth, lw=1.5, label=f"mean of {window}")
    ax.axhline(1.0, color="grey", ls="--", lw=1, label="predicting the mean (1.0)")
    ax.set(xlabel="step", ylabel="distillation MSE (standardised)", title=title,
           ylim=(0, max(1.3, float(smooth[0]))))
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def _update_manifest(assets: Path, size: str, entry: dict) -> None:
    path = assets / "teachers.json"
    manifest = json.loads(path.read_text()) if path.is_file() else {"format": "edge-inspect-teachers"}
    manifest.setdefault("teachers", {})[size] = entry
    manifest["sources"] = [{"package": s.package, "path": s.path, "licence": s.licence} for s in SOURCES]
    manifest["procedural_textures"] = list(TEXTURE_KINDS)
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _progress(started: float):
    def report(step: int, total: int, info: dict) -> None:
        rate = (time.perf_counter() - started) / step
        print(f"step {step}/{total} loss {info['teacher_loss']:.4f} {rate:.2f} s/step "
              f"eta {rate * (total - step) / 60:.1f} min", flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    images = collection_images(textures=args.textures, seed=args.seed)
    print(f"{len(images)} images ({len(SOURCES)} packaged sources, {args.textures} textures); "
          f"cpu {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads", flush=True)
    torch.manual_seed(args.seed)
    teacher = PDN_BUILDERS[args.size](TEACHER_CHANNELS)
    config = DistillConfig(crop=args.crop, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                           seed=args.seed, time_budget=60.0 * args.time_budget, device=args.device)
    work = Path(args.work)

    def checkpoint(step: int, loss: list[float]) -> None:
        save_teacher(work / f"teacher-{args.size}.partial.pt", teacher, args.size, {"step": step})
        (work / f"teacher-{args.size}.loss.json").write_text(json.dumps(loss))

    summary = distill_teacher(teacher, images, config, IMAGENET_MEAN, IMAGENET_STD,
                              _progress(time.perf_counter()), checkpoint)
    loss = summary["loss"]
    command = "python -m trainer.distill " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    info = {"steps": summary["steps"], "steps_asked": args.steps, "time_budget_min": args.time_budget,
            "batch_size": args.batch_size, "crop": args.crop, "lr": args.lr,
            "seed": args.seed, "images": len(images), "textures": args.textures, "command": command,
            "loss_first_10": float(np.mean(loss[:10])), "loss_last_50": float(np.mean(loss[-50:])),
            "seconds": round(summary["seconds"], 1), "torch": torch.__version__,
            "dtype": "float16" if args.half else "float32", "device": args.device}
    assets = Path(args.assets)
    name = f"teacher-{args.size}.pt"
    sha = save_teacher(assets / name, teacher, args.size, info, half=args.half)
    _update_manifest(assets, args.size, {"file": name, "sha256": sha, **info})
    (work / f"teacher-{args.size}.loss.json").write_text(json.dumps(loss))
    plot_curve(loss, Path(args.docs) / f"teacher-{args.size}-loss.png",
               f"PDN-{args.size.upper()} teacher: {summary['steps']} steps x {args.batch_size} views of "
               f"{args.crop} px")
    print(f"wrote {assets / name} sha256 {sha}; "
          f"loss {info['loss_first_10']:.3f} -> {info['loss_last_50']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
