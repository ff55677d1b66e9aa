"""The pilot of issue 15: does this ConMIM implementation learn at `tiny` scale, and how fast?

Runs, in this process and on one seed, pre-trainings of growing length and records, per epoch,
the k-NN top-1 on the **validation** split of the momentum and of the online encoder (from their
random initialisation at epoch 0), the positional-shortcut diagnostics at the end, and how a
low-label and a full-label fine-tune respond (validation top-1 only: the pilot chooses the
study's protocol, so it never reads the test split). Results go to OUT/pilot.json (a run already
there is not run again) and OUT/pilot.png.

    python benchmarks/pilot.py --out docs/results/pilot
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

VIT = {}  # the tiny preset's encoder: timm ViT, absolute position embedding
BEIT = {"model.name": "beit_base_patch16_224", "model.shared_rel_pos_bias": True, "model.layer_scale_init": 0.1}
LOW = {"finetune.labels_per_class": 100, "finetune.epochs": 15}  # 1 000 labels
# the pre-training settings of `tiny` when the pilot ran, pinned: the preset has since moved to what
# the pilot chose (batch 64), and a rerun must run the pilot, not the new preset
PILOT_BASE = {"pretrain.batch_size": 256, "pretrain.lr_batch_size": 256, "pretrain.warmup_epochs": 1}


def runs(epochs: int) -> list[tuple[str, dict, bool]]:
    """(name, overrides, curve), in the order they run: curve runs record k-NN every 2 epochs.
    Which encoder the budget runs use was decided by the first two (see docs/results/pilot.md)."""
    out = [(f"{model}_m0.99_{epochs}ep", {**mset, "objective.momentum": 0.99, "pretrain.epochs": epochs}, True)
           for model, mset in (("vit", VIT), ("beit", BEIT))]
    for budget in (epochs // 4, epochs // 2):
        out.append((f"vit_m0.99_{budget}ep", {**VIT, "objective.momentum": 0.99, "pretrain.epochs": budget}, False))
    for model, mset in (("vit", VIT), ("beit", BEIT)):
        out.append((f"{model}_scratch", {**mset, "pretrain.enabled": False}, False))
    for model, mset in (("vit", VIT), ("beit", BEIT)):
        out.append((f"{model}_shared_no_stop_grad_{epochs // 2}ep", {**mset, "objective.target_encoder": "shared",
                    "objective.stop_grad": False, "pretrain.epochs": epochs // 2}, False))
    out.append((f"vit_m0.996_{epochs // 2}ep", {**VIT, "objective.momentum": 0.996, "pretrain.epochs": epochs // 2}, False))
    # more optimiser steps for the same images: batch 64 (lr 1e-3 as given, not scaled down), as many
    # steps in 10 epochs as batch 256 takes in 40, at a quarter of the images
    small = {"pretrain.batch_size": 64, "pretrain.lr_batch_size": 64, "pretrain.warmup_epochs": 0.5}
    for budget in (epochs // 8, epochs // 4):
        out.append((f"vit_b64_m0.99_{budget}ep", {**VIT, **small, "objective.momentum": 0.99,
                                                  "pretrain.epochs": budget}, True))
    return [(name, {**PILOT_BASE, **overrides}, curve) for name, overrides, curve in out]


def steps_per_epoch(run: dict) -> int:
    """Optimiser steps in an epoch of the pilot's 8 000 images (records written before PILOT_BASE
    existed name no batch size: theirs was 256)."""
    return 8000 // run["overrides"].get("pretrain.batch_size", 256)


def one(name: str, overrides: dict, curve: bool, seed: int, low_label: bool = True, proxy_every: int = 2) -> dict:
    from conmim.config import load_config
    from conmim.data.sources import load_splits
    from conmim.train.build import build_conmim, build_encoder
    from conmim.train.diagnostics import shortcut_diagnostics
    from conmim.train.evaluate import knn_top1_of
    from conmim.train.finetune import finetune
    from conmim.train.pretrain import pretrain
    from conmim.train.session import LocalSession

    sets = {**overrides, "seed": seed, "eval.proxy_every": proxy_every if curve else 0, "eval.probe_online": True,
            "pretrain.checkpoint_every": 1000}
    cfg = load_config("tiny", [f"{k}={json.dumps(v) if isinstance(v, bool) else v}" for k, v in sets.items()])
    splits = load_splits(cfg.data)
    work = Path(tempfile.mkdtemp(prefix=f"conmim-pilot-{name}-"))
    t0 = time.time()
    rec: dict = {"name": name, "overrides": overrides, "seed": seed}
    if cfg.pretrain.enabled:
        torch.manual_seed(cfg.seed)
        init = build_conmim(cfg)  # the random initialisation both encoders start from (epoch 0)
        knn0 = knn_top1_of(init.online.encoder, splits["train"], splits["val"], cfg, "cpu")
        pre = pretrain(cfg, LocalSession(work, "pretrain"))
        net = pre.pop("net")
        rec["curve"] = [{"epoch": 0, "knn_momentum": knn0, "knn_online": knn0}] + [
            {"epoch": h["epoch"], "knn_momentum": h.get("knn_proxy_top1"),
             "knn_online": h.get("knn_proxy_online_top1", h.get("knn_proxy_top1")),
             "loss": h["pretrain_loss"], "epoch_seconds": h["epoch_seconds"]}
            for h in pre["history"] if "knn_proxy_top1" in h or not curve]
        rec["final_loss"] = pre["final_pretrain_loss"]
        rec["losses"] = [h["pretrain_loss"] for h in pre["history"]]
        rec["pretrain_seconds"] = pre["pretrain_seconds"]
        rec["knn_momentum"] = knn_top1_of(net.encoder(cfg.finetune.encoder), splits["train"], splits["val"], cfg, "cpu")
        rec["knn_online"] = knn_top1_of(net.online.encoder, splits["train"], splits["val"], cfg, "cpu")
        rec.update(shortcut_diagnostics(net, splits["val"], cfg.model.img_size, "cpu"))
        state = {k: v.detach().clone() for k, v in net.encoder(cfg.finetune.encoder).state_dict().items()}
    else:
        torch.manual_seed(cfg.seed)
        encoder = build_encoder(cfg)  # (one encoder: the k-NN is of the initialisation that is fine-tuned)
        state = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
        rec["knn_momentum"] = rec["knn_online"] = knn_top1_of(encoder.eval(), splits["train"], splits["val"], cfg, "cpu")
    low = load_config("tiny", [f"{k}={json.dumps(v) if isinstance(v, bool) else v}" for k, v in {**sets, **LOW}.items()])
    if low_label:
        t1 = time.time()
        rec["low_label_val_top1"] = finetune(low, LocalSession(work, "ft_low"), state, test=False)["finetune_val_top1"]
        rec["low_label_seconds"] = time.time() - t1
    t1 = time.time()
    rec["full_label_val_top1"] = finetune(cfg, LocalSession(work, "ft_full"), state, test=False)["finetune_val_top1"]
    rec["full_label_seconds"] = time.time() - t1
    rec["wall_seconds"] = time.time() - t0
    return rec


def plot(results: list[dict], path: Path, epochs: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    scratch = {r["name"].split("_")[0]: r for r in results if r["name"].endswith("scratch")}
    palette = iter(["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"])
    for r in results:
        pts = [p for p in r.get("curve", []) if p.get("knn_momentum") is not None]
        if len(pts) < 3:
            continue
        c = next(palette)
        e = [p["epoch"] * steps_per_epoch(r) for p in pts]
        a.plot(e, [100 * p["knn_momentum"] for p in pts], "-o", ms=3, color=c, label=f"{r['name']} momentum")
        a.plot(e, [100 * p["knn_online"] for p in pts], "--", color=c, label=f"{r['name']} online")
    a.set_xlabel("optimiser steps (an epoch of 8 000 images: 31 at batch 256, 125 at batch 64)")
    a.set_ylabel("k-NN top-1 on validation (%)")
    a.set_title("frozen encoders vs their random initialisation (epoch 0)")
    a.legend(fontsize=7)
    a.grid(alpha=0.3)
    for kind, marker in (("low_label_val_top1", "o-"), ("full_label_val_top1", "s--")):
        pts = sorted((r["overrides"].get("pretrain.epochs", 0), 100 * r[kind]) for r in results
                     if r["name"].startswith("vit_m0.99_"))
        if "vit" in scratch:
            pts = [(0, 100 * scratch["vit"][kind])] + pts
        b.plot([p[0] for p in pts], [p[1] for p in pts], marker, color="#d62728",
               label=("1 000-label fine-tune, 15 ep" if kind.startswith("low") else "full-label fine-tune, 2 ep"))
    b.set_xlabel("pre-training epochs (0 = from scratch), ViT (absolute position), m = 0.99")
    b.set_ylabel("fine-tuned top-1 on validation (%)")
    b.set_title("fine-tuning vs pre-training budget")
    b.legend(fontsize=8)
    b.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def open_record(store: Path, how: str) -> tuple[Path, dict]:
    """A pilot's record (its runs so far: a rerun skips them), stamped with this sitting's machine,
    commit and command."""
    store.parent.mkdir(parents=True, exist_ok=True)
    doc = json.loads(store.read_text()) if store.exists() else {"runs": []}
    doc["machine"] = f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores, {how}"
    doc["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                   cwd=Path(__file__).parent).stdout.strip()
    doc["command"] = f"python benchmarks/{Path(sys.argv[0]).name} " + " ".join(sys.argv[1:])
    return store, doc


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="docs/results/pilot")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", action="append", default=[], help="run only these names")
    a = ap.parse_args()
    out = Path(a.out)
    store, doc = open_record(out / "pilot.json", f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    have = {r["name"] for r in doc["runs"]}
    for name, overrides, curve in runs(a.epochs):
        if name in have or (a.only and name not in a.only):
            continue
        print(f"[pilot] {name} ...", flush=True)
        rec = one(name, overrides, curve, a.seed)
        doc["runs"].append(rec)
        store.write_text(json.dumps(doc, indent=1))
        print(f"[pilot] {name}: k-NN(val) momentum {rec['knn_momentum']:.4f} online {rec['knn_online']:.4f}, "
              f"low-label FT(val) {rec['low_label_val_top1']:.4f}, full-label FT(val) {rec['full_label_val_top1']:.4f}, "
              f"all-masked loss {rec.get('all_masked_loss', float('nan')):.3f}, {rec['wall_seconds']:.0f} s", flush=True)
    plot(doc["runs"], out / "pilot.png", a.epochs)


if __name__ == "__main__":
    main()
