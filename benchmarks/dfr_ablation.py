"""DFR ablation: image AUROC per texture category and defect type, and on ELPV mono, per setting.

    python benchmarks/dfr_ablation.py --out runs/dfr-ablation                       # every setting
    python benchmarks/dfr_ablation.py --settings paper default --elpv --out runs/dfr-ablation
    python benchmarks/dfr_ablation.py --define 'mine={"model": {"taps": [4, 8]}, "train": {"steps": 300}}' \
        --settings mine --out /tmp/x

Each setting builds DFR (trainer.models.dfr) with its model options and trains its autoencoder on the
training split of each category of the real-texture set (trainer/data/textures.py, written under
<out>/textures unless --data is given; 128 x 128 crops) and, with --elpv, of ELPV mono (whole 300 x 300
cells). To fit a loaded 2-core CPU, the regional features of every image are computed once (the model's own
``raw_regional_features``) and the autoencoder is trained on random batches of feature vectors drawn from all
training images (``--vectors`` per step, Adam, the model's standardisation and PCA latent size, lr drop at
95 %). ``edge-train train`` instead feeds random tile crops (batch 8 of 128 x 128 = 8192 vectors): the
autoencoder is 1 x 1 convolutions, so the two differ only in how BatchNorm batches are composed and, for
ELPV, in crop borders. The image score is the product's (trainer.calibrate.image_score of the raw map; the
calibrated normalisation is affine, so the AUROC is the same). The z-score baselines of
benchmarks/zscore_baseline.py run on the same data (--baselines). Writes <out>/results.json and results.md.

The train seconds are wall time on whatever machine ran it (printed with its CPU model and ISA features);
they are only comparable within one quiet run.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BASE_TRAIN = {"steps": 500, "vectors": 2048, "lr": 1e-3, "pca_variance": 0.9}
# name -> model options (create_model("dfr", **model)) and training fields (over BASE_TRAIN)
SETTINGS: dict[str, dict] = {
    "paper": {"model": {"taps": [2, 4, 8, 16], "input_pad": 0, "standardise": False}},
    "+input_pad": {"model": {"taps": [2, 4, 8, 16], "input_pad": 32, "standardise": False}},
    "default": {"model": {}},  # taps 2,4,8, input_pad 32, standardised
}
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "asimd")


def cpu_description() -> str:
    """CPU model name and the SIMD features relevant to torch, from /proc/cpuinfo where it exists."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")),
                 platform.machine())
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines()
                  if ln.startswith(("flags", "Features"))), [])
    return f"{model}; ISA {' '.join(f for f in ISA_FLAGS if f in flags) or 'n/a'}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmarks/dfr_ablation.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--settings", nargs="+", help=f"settings to run (default all): {', '.join(SETTINGS)}")
    p.add_argument("--define", action="append", default=[], metavar="NAME=JSON",
                   help='extra setting: NAME={"model": {...}, "train": {...}} (repeatable)')
    p.add_argument("--categories", nargs="+", default=["brick", "grass", "gravel"])
    p.add_argument("--data", metavar="DIR", help="texture set root (default: written to <out>/textures)")
    p.add_argument("--no-textures", action="store_true", help="skip the texture categories")
    p.add_argument("--elpv", action="store_true", help="also train and test on ELPV mono (tile 256)")
    p.add_argument("--elpv-limit", type=int, help="ELPV: at most this many mono cells (quick runs)")
    p.add_argument("--baselines", action="store_true", help="also run the z-score baselines")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads (2)")
    p.add_argument("--out", required=True, metavar="DIR")
    return p


def _settings(args) -> dict[str, dict]:
    table = dict(SETTINGS)
    for item in args.define:
        name, _, spec = item.partition("=")
        table[name] = json.loads(spec)
    names = args.settings or list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise SystemExit(f"unknown settings {unknown}: valid are {sorted(table)}")
    return {n: table[n] for n in names}


def _datasets(args, out: Path) -> dict[str, object]:
    from trainer.data.elpv import load_elpv
    from trainer.data.mvtec import load_mvtec
    from trainer.data.textures import write_texture_tree

    data = {}
    if not args.no_textures:
        root = Path(args.data) if args.data else out / "textures"
        for cat in args.categories:
            if not (root / cat).is_dir():
                write_texture_tree(root, cat, seed=args.seed)
            data[cat] = load_mvtec(root, cat, seed=args.seed)
    if args.elpv:
        data["elpv-mono"] = load_elpv("mono", seed=args.seed, limit=args.elpv_limit)
    return data


def _aurocs(scores: np.ndarray, test) -> dict[str, float]:
    from trainer.metrics import image_auroc

    groups = np.array(test.groups)
    main = ~np.isin(groups, test.separate_groups)
    out = {"all": image_auroc(scores[main], test.labels[main])}
    good = groups == "good"
    for g in sorted(set(test.groups) - {"good"} - set(test.separate_groups)):
        sel = good | (groups == g)
        out[g] = image_auroc(scores[sel], groups[sel] == g)
    return out


def _features(model, images: list[np.ndarray]):
    import torch

    from trainer.fit import normalise

    out = []
    with torch.no_grad():
        for im in images:
            x = torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1)[None].float() / 255.0
            x = normalise(x.expand(-1, 3, -1, -1), model.input_mean, model.input_std)
            out.append(model.raw_regional_features(x)[0])
    return out


def train_on_vectors(model, train_feats, setting: dict, seed: int) -> dict:
    """Standardisation, PCA latent size and autoencoder training on pooled feature vectors."""
    import torch

    from trainer import losses
    from trainer.models.dfr import pca_latent_dim

    cfg = {**BASE_TRAIN, **setting.get("train", {})}
    pool = torch.cat([f.flatten(1).T for f in train_feats])
    if model.standardise:
        model.set_feature_stats(pool)
        pool = (pool - model.feature_mean.view(1, -1)) / model.feature_std.view(1, -1)
    torch.manual_seed(seed)
    ae = model.build_autoencoder(pca_latent_dim(pool, cfg["pca_variance"]))
    optimizer = torch.optim.Adam(ae.parameters(), lr=cfg["lr"], weight_decay=1e-5)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    losses_seen = []
    for step in range(cfg["steps"]):
        for group in optimizer.param_groups:
            group["lr"] = cfg["lr"] * (0.1 if step >= 0.95 * cfg["steps"] else 1.0)
        x = pool[torch.randint(0, pool.shape[0], (cfg["vectors"],), generator=gen)][:, :, None, None]
        loss = losses.dfr_loss(x, ae(x))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses_seen.append(float(loss.detach()))
    model.eval()
    return {"latent": model.latent, "final_loss": float(np.mean(losses_seen[-20:]))}


def run_dfr(setting: dict, splits, seed: int) -> dict:
    """Train DFR with one setting on one data set; AUROCs, latent size and seconds."""
    import torch

    from inspection.verdict import smooth_map
    from trainer.models.registry import create_model

    def image_score(m):  # the daemon's score of a map: max after a sigma-1 Gaussian (inspection.verdict)
        return float(smooth_map(np.ascontiguousarray(m, dtype=np.float32), 1.0).max())

    torch.manual_seed(seed)
    model = create_model("dfr", "s", **setting.get("model", {})).eval()
    start = time.perf_counter()
    info = train_on_vectors(model, _features(model, splits.train), setting, seed)
    seconds = time.perf_counter() - start
    scores = []
    with torch.no_grad():
        for f in _features(model, splits.test.images):
            f = (f - model.feature_mean[0]) / model.feature_std[0] if model.standardise else f
            scores.append(image_score(((model.autoencoder(f[None]) - f[None]) ** 2).sum(1)[0].numpy()))
    return {"auroc": _aurocs(np.array(scores), splits.test), **info, "train_s": round(seconds, 1)}


def run_baseline(mode: str, splits) -> dict:
    from zscore_baseline import fit_zscore, zscore_score

    if mode == "position" and len({im.shape for im in splits.train + splits.test.images}) > 1:
        return {"auroc": {}, "note": "sizes differ"}
    model = fit_zscore(splits.train, mode)
    scores = np.array([zscore_score(model, im) for im in splits.test.images])
    return {"auroc": _aurocs(scores, splits.test)}


def markdown(results: dict, datasets: list[str], groups: dict[str, list[str]]) -> str:
    head = ["setting"] + [f"{d} {g}" for d in datasets for g in groups[d]] + ["mean all", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, per in results.items():
        cells = [f"{per[d]['auroc'].get(g, float('nan')):.3f}" if d in per else "" for d in datasets
                 for g in groups[d]]
        alls = [per[d]["auroc"]["all"] for d in datasets if d in per and "all" in per[d]["auroc"]]
        secs = sum(per[d].get("train_s", 0.0) for d in datasets if d in per)
        lines.append("| " + " | ".join([name, *cells, f"{np.mean(alls):.3f}", f"{secs:.0f}"]) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = _settings(args)
    data = _datasets(args, out)
    machine = f"{cpu_description()}; torch {torch.__version__}, {args.threads} threads"
    print(machine, flush=True)
    results: dict[str, dict] = {}
    if args.baselines:
        for mode in ("position", "patch"):
            results[f"z-score {mode}"] = {d: run_baseline(mode, s) for d, s in data.items()}
    for name, setting in settings.items():
        results[name] = {}
        for d, splits in data.items():
            results[name][d] = r = run_dfr(setting, splits, args.seed)
            print(f"{name:>16} {d:>10} " + " ".join(f"{g} {v:.3f}" for g, v in r["auroc"].items())
                  + f"  latent {r['latent']}  loss {r['final_loss']:.4f}  {r['train_s']} s", flush=True)
    groups = {d: ["all", *sorted(set(s.test.groups) - {"good"} - set(s.test.separate_groups))]
              for d, s in data.items()}
    (out / "results.json").write_text(json.dumps({"machine": machine, "base_train": BASE_TRAIN,
                                                  "settings": settings, "results": results}, indent=1))
    (out / "results.md").write_text(f"Machine: {machine}\n\n" + markdown(results, list(data), groups))
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
