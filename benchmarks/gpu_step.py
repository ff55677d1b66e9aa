"""The ConMIM pre-training step of ViT-B/16 (BEiT, the `vit-b16-imagenet` preset) at 224², bf16, on
one NVIDIA GPU: the step alone on pre-made tensors, and the project's real loop (`pretrain()`:
JPEG decoding and cropping in loader workers, the views on the GPU) on a generated ImageFolder at
the same batch, in one run. Prints both images/s, their ratio, and MFU against a bf16 matmul
measured in the same run.

For a bare GPU box: torch, timm, pydantic and pyyaml are enough (it imports `conmim` from the
checkout; no Ray, no MLflow).

    python benchmarks/gpu_step.py [--batch 64] [--steps 30] [--workers 12] [--compile]
    python benchmarks/gpu_step.py --flops-only     # no GPU: FLOPs per image and the paper-scale cost
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402


def config(root: Path, batch: int, workers: int, epochs: int, sets: list[str], compile_: bool):
    from conmim.config import load_config
    return load_config("vit-b16-imagenet", [
        f"data.root={root}", "data.val_size=8", f"data.num_workers={workers}", f"pretrain.epochs={epochs}",
        f"pretrain.batch_size={batch}", f"pretrain.lr_batch_size={batch}", "pretrain.warmup_epochs=0",
        "pretrain.checkpoint_every=1000", "eval.proxy_every=0", "resources.num_workers=1",
        f"pretrain.compile={str(compile_).lower()}", *sets], check_paths=False)


def step_alone(cfg, dev, steps: int):
    """images/s and FLOPs of the step (forward, backward, AdamW, EMA) on pre-made device tensors."""
    from conmim.method.vit import param_groups
    from conmim.train.build import build_conmim
    net = build_conmim(cfg).to(dev)
    model = torch.compile(net) if cfg.pretrain.compile else net
    opt = torch.optim.AdamW(param_groups(net.online, 0.05), lr=5e-4, betas=(0.9, 0.98), fused=dev.type == "cuda")
    B, S, P = cfg.pretrain.batch_size, cfg.model.img_size, cfg.model.grid ** 2
    xo, xt = torch.randn(B, 3, S, S, device=dev), torch.randn(B, 3, S, S, device=dev)
    mask = torch.zeros(B, P, dtype=torch.bool, device=dev)
    mask[:, torch.randperm(P)[:net.rows]] = True

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.pretrain.amp):
            loss_sum, _ = model(xo, xt, mask, mask)
        loss = loss_sum / (B * net.rows)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(net.online.parameters(), float("inf"))
        opt.step()
        net.update_momentum(0.996)

    for _ in range(5):
        step()
    sync(dev)
    with FlopCounterMode(display=False) as fc:
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync(dev)
    return B * steps / (time.perf_counter() - t), fc.get_total_flops()


def real_loop(cfg, dev):
    """images/s of `pretrain()` in its last epoch (the first carries the warm-up)."""
    from conmim.train.pretrain import pretrain
    from conmim.train.session import LocalSession
    res = pretrain(cfg, LocalSession(Path(tempfile.mkdtemp(prefix="conmim-gpu-step-")), "pretrain", str(dev)))
    from conmim.data.sources import load_splits
    n = len(load_splits(cfg.data)["train"]) // cfg.pretrain.batch_size * cfg.pretrain.batch_size
    return n / res["history"][-1]["epoch_seconds"]


def matmul_peak(dev, dtype=torch.bfloat16, n: int = 8192) -> float:
    x, y = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(3):
        x @ y
    sync(dev)
    t = time.perf_counter()
    for _ in range(20):
        x @ y
    sync(dev)
    return 2 * n ** 3 * 20 / (time.perf_counter() - t)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def count_flops(tflops: float, batch: int = 2):
    """FLOPs of one ConMIM step per image (online fwd+bwd on the masked view, momentum fwd on the
    full view, projectors), counted on the CPU; then the GPU-hours of the reference recipes."""
    from conmim.config import load_config
    from conmim.train.build import build_conmim, build_encoder
    cfg = load_config("vit-b16-imagenet", ["data.root=/nonexistent"], check_paths=False)
    net = build_conmim(cfg)
    xo, xt = torch.randn(batch, 3, 224, 224), torch.randn(batch, 3, 224, 224)
    mask = torch.zeros(batch, 196, dtype=torch.bool)
    mask[:, torch.randperm(196)[:net.rows]] = True
    with FlopCounterMode(display=False) as fc:
        net(xo, xt, mask, mask)[0].backward()
    per_image = fc.get_total_flops() / batch
    enc = build_encoder(cfg, for_finetune=True)
    with FlopCounterMode(display=False) as fc:  # fine-tuning: the encoder alone, forward + backward
        enc(xt).float().mean().backward()
    ft_image = fc.get_total_flops() / batch
    print(f"model FLOPs/image/step  {per_image / 1e9:.1f} GFLOP (pre-training, ViT-B/16 224^2)")
    print(f"assumed throughput      {tflops:.1f} TFLOP/s per GPU -> {tflops * 1e12 / per_image:.0f} images/s")
    for epochs in (300, 800, 1600):
        hours = per_image * 1_281_167 * epochs / (tflops * 1e12) / 3600
        print(f"ImageNet-1K x {epochs:4d} epochs  {hours:7.0f} GPU-hours ({hours / 8:.0f} h on 8 GPUs)")
    ft_hours = ft_image * 1_281_167 * 100 / (tflops * 1e12) / 3600
    print(f"fine-tune FLOPs/image   {ft_image / 1e9:.1f} GFLOP; 100 epochs: {ft_hours:.0f} GPU-hours")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=30, help="timed steps of the step alone; the real loop runs as many")
    ap.add_argument("--workers", type=int, default=12, help="data.num_workers of the real loop")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu to check the script itself")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="config override (e.g. for a CPU check)")
    ap.add_argument("--flops-only", action="store_true", help="count FLOPs on the CPU; no GPU needed")
    ap.add_argument("--assume-tflops", type=float, default=989.4 * 0.4,
                    help="with --flops-only: sustained bf16 TFLOP/s per GPU (default: 40 %% of the H100 SXM's 989.4)")
    a = ap.parse_args()
    if a.flops_only:
        return count_flops(a.assume_tflops)
    dev = torch.device(a.device)
    if dev.type == "cuda":
        assert torch.cuda.is_available(), "needs an NVIDIA GPU (or --device cpu to check the script)"
        torch.backends.cuda.matmul.allow_tf32 = True
    from input_pipeline import write_jpegs
    root = write_jpegs(Path(tempfile.mkdtemp(prefix="conmim-jpegs-")), a.steps * a.batch)
    cfg = config(root, a.batch, a.workers, 2, a.sets, a.compile)
    alone, flops = step_alone(cfg, dev, a.steps)
    loop = real_loop(cfg, dev)
    peak = matmul_peak(dev, torch.bfloat16 if dev.type == "cuda" else torch.float32, 8192 if dev.type == "cuda" else 1024)
    per_image = flops / a.batch
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    print(f"device            {name}; batch {a.batch}, bf16 autocast {cfg.pretrain.amp}"
          f"{', compiled' if a.compile else ''}, {cfg.model.name} {cfg.model.img_size}^2")
    print(f"model FLOPs/image {per_image / 1e9:.1f} GFLOP")
    print(f"step alone        {alone:8.1f} images/s  (MFU {alone * per_image / peak:.3f})")
    print(f"real loop         {loop:8.1f} images/s  (data.num_workers={a.workers}, JPEG ImageFolder)")
    print(f"real / alone      {loop / alone:.3f}")
    print(f"matmul peak       {peak / 1e12:.1f} TFLOP/s (measured here)")
    if dev.type == "cuda":
        print(f"peak GPU memory   {torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GiB")


if __name__ == "__main__":
    main()
