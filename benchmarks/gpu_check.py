"""The paper-scale path on one NVIDIA GPU, without Ray or MLflow: does the project's own
pre-training -> probes -> fine-tuning run on CUDA under NCCL, with bf16 and every collective on?

For a bare GPU box where only torch, timm, pydantic and pyyaml are installed (no `pip install` of
this project: it imports `conmim` from the checkout). It writes a small JPEG ImageFolder, starts
a one-rank NCCL process group, and runs `pretrain()`, the frozen-feature probes and `finetune()`
of `vit-b16-imagenet` (BEiT-B/16 at 224², bf16 autocast) with the collectives forced on (DDP,
the loss and top-1 all-reduces, barriers), as a multi-GPU Ray Train worker would. It prints
PASS/FAIL per phase with images/s, and exits 1 if any phase failed.

    python benchmarks/gpu_check.py                      # on a GPU: the preset as it is, batch 64
    python benchmarks/gpu_check.py --device cpu --set model.img_size=32 ...   # the same code on a CPU (gloo)
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's conmim, not an installed one

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def write_imagefolder(root: Path, classes: int, per_class: int, val_per_class: int, size: int = 256) -> Path:
    """JPEGs whose class is a colour and an orientation of stripes, plus noise: learnable, and
    decoded and cropped like ImageNet's (3 channels, 8-bit, not square)."""
    from PIL import Image
    g = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:int(size * 1.25)]
    for split, n in (("train", per_class), ("val", val_per_class)):
        for c in range(classes):
            d = root / split / f"class{c:03d}"
            d.mkdir(parents=True, exist_ok=True)
            angle = np.pi * c / classes
            stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) / 6.0)
            colour = np.array([(c * 97) % 256, (c * 57) % 256, (c * 31) % 256], dtype=np.float64)
            for i in range(n):
                img = 128 + 60 * stripes[..., None] * (colour / 255)[None, None] + g.normal(0, 25, stripes.shape + (3,))
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f"{i:04d}.jpg", quality=90)
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def phase(name: str, fn, images: int, results: list) -> object:
    t0 = time.perf_counter()
    try:
        out = fn()
    except Exception:  # noqa: BLE001 - a check reports every phase, then fails
        traceback.print_exc()
        results.append((name, False, float("nan"), time.perf_counter() - t0))
        print(f"FAIL  {name}", flush=True)
        return None
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    results.append((name, True, images / dt, dt))
    print(f"PASS  {name:<10} {images / dt:9.1f} images/s  ({images} images in {dt:.1f} s)", flush=True)
    return out


def flex_matches_sdpa(cfg, device: str, batch: int = 8) -> str:
    """``pretrain.attention=flex``: the compiled encoder's forward and backward (bf16 autocast, as
    pre-training runs it) against timm's SDPA, eager, from the same weights: the tokens and the
    gradients of the relative position bias table and the first block's qkv weight. Off a GPU,
    where FlexAttention has no backward and the encoder would fall back to SDPA, its (eager)
    FlexAttention forward is made to run anyway and its tokens alone are compared (float32): the
    script's own check of FlexAttention, not SDPA against SDPA."""
    from conmim.method.attention import FlexBiasedAttention
    from conmim.train.build import build_encoder
    on_gpu = torch.device(device).type == "cuda"
    torch.manual_seed(0)
    flex = build_encoder(cfg).to(device)
    sdpa = build_encoder(cfg.model_copy(update={"pretrain": cfg.pretrain.model_copy(update={"attention": "sdpa"})}))
    for name, p in flex.named_parameters():
        if name.endswith(("relative_position_bias_table", "q_bias", "v_bias")):  # (zero-initialised: a bias that shows)
            torch.nn.init.normal_(p, std=0.5)
    sdpa.load_state_dict(flex.state_dict())
    sdpa.to(device)
    S, P = cfg.model.img_size, cfg.model.grid ** 2
    x = torch.randn(batch, 3, S, S, device=device)
    mask = torch.rand(batch, P, device=device) < 0.4
    g = torch.randn(batch, P + 1, flex.embed_dim, device=device)
    if not on_gpu:
        calls = []
        real_use_flex = FlexBiasedAttention.__dict__["use_flex"]  # (the staticmethod itself, to put back)
        FlexBiasedAttention.use_flex = staticmethod(lambda t: not calls.append(1))
        try:
            with torch.no_grad():
                ref, out = sdpa.eval()(x, mask), flex.eval()(x, mask)
        finally:
            FlexBiasedAttention.use_flex = real_use_flex
        error = ((out - ref).abs().max() / ref.abs().max()).item()
        assert calls, "the encoder did not take FlexAttention"
        assert error < 1e-4, f"FlexAttention differs from SDPA: {error}"
        return f"FlexAttention forward on the cpu (eager; no backward there): tokens max rel. difference {error:.1e}"
    outs, grads = [], []
    for enc, fn in ((sdpa, sdpa), (flex, torch.compile(flex))):
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            out = fn(x, mask)
        (out.float() * g).sum().backward()
        outs.append(out.float())
        grads.append([p.grad.float() for n, p in enc.named_parameters()
                      if n in ("vit.rel_pos_bias.relative_position_bias_table", "vit.blocks.0.attn.qkv.weight")])
    errors = [((a - b).abs().max() / b.abs().max()).item() for a, b in zip([outs[1], *grads[1]], [outs[0], *grads[0]])]
    assert len(errors) == 3 and max(errors) < 0.05, f"FlexAttention differs from SDPA: {errors}"
    return "tokens, bias-table gradient, qkv gradient: max rel. difference " + ", ".join(f"{e:.1e}" for e in errors)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (NCCL) or cpu (gloo, to check the script itself)")
    ap.add_argument("--preset", default="vit-b16-imagenet")
    ap.add_argument("--batch", type=int, default=64, help="per-GPU batch of pre-training and fine-tuning")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--per-class", type=int, default=64, help="training images per class")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="config override, repeatable")
    ap.add_argument("--compile", nargs="?", const="true", metavar="MODE",
                    help="also set pretrain.compile: alone = true, or a mode (reduce-overhead = CUDA graphs)")
    a = ap.parse_args()

    from conmim.config import load_config
    from conmim.config.experiment import CUDA_GRAPH_MODES
    from conmim.data.sources import load_splits
    from conmim.train.build import build_encoder
    from conmim.train.evaluate import probes
    from conmim.train.finetune import finetune
    from conmim.train.pretrain import pretrain
    from conmim.train.session import LocalSession, init_process_group

    cuda = a.device.startswith("cuda")
    if cuda:
        assert torch.cuda.is_available(), "no CUDA device: run with --device cpu to check the script on a CPU"
        torch.cuda.set_device(0)
        torch.backends.cuda.matmul.allow_tf32 = True
    work = Path(tempfile.mkdtemp(prefix="conmim-gpu-check-"))
    root = write_imagefolder(work / "imagefolder", a.classes, a.per_class, max(4, a.per_class // 4))
    n_train = a.classes * a.per_class
    sets = [f"data.root={root}", f"data.val_size={a.classes * 4}", f"data.num_workers={min(8, os.cpu_count() or 1)}",
            "pretrain.epochs=1", f"pretrain.batch_size={a.batch}", f"pretrain.lr_batch_size={a.batch}",
            "pretrain.warmup_epochs=0", "pretrain.amp=true", "pretrain.checkpoint_every=1",
            "finetune.epochs=1", f"finetune.batch_size={a.batch}", f"finetune.lr_batch_size={a.batch}",
            "finetune.warmup_epochs=0", "eval.probe_epochs=2", "eval.proxy_every=1",
            "resources.num_workers=1", f"resources.use_gpu={str(cuda).lower()}",
            f"resources.gpus_per_worker={1 if cuda else 0}",
            *([f"pretrain.compile={a.compile}"] if a.compile else []), *a.sets]
    cfg = load_config(a.preset, sets)

    backend = "nccl" if cuda else "gloo"
    init_process_group(backend, f"tcp://127.0.0.1:{free_port()}", 0, 1, cfg.resources.collective_timeout_s)
    device = "cuda:0" if cuda else "cpu"
    print(f"device   {torch.cuda.get_device_name(0) if cuda else 'cpu'}; torch {torch.__version__}; "
          f"process group {dist.get_backend()} (1 rank, collectives forced on)")
    print(f"model    {cfg.model.name} {cfg.model.img_size}² (final norm: "
          f"{type(build_encoder(cfg).vit.norm).__name__}), batch {a.batch}, bf16 autocast, "
          f"{n_train} training JPEGs in {root}")
    results: list = []
    try:
        pre_session = LocalSession(work / "run", "pretrain", device, force_collectives=True)
        ft_session = LocalSession(work / "run", "finetune", device, force_collectives=True)
        steps = n_train // a.batch
        if cfg.pretrain.attention == "flex":
            flex = phase("attention", lambda: flex_matches_sdpa(cfg, device), 8, results)
            print(f"         {flex}" if flex else "", flush=True)
        pre = phase("pretrain", lambda: pretrain(cfg, pre_session), steps * a.batch, results)
        if pre is not None:
            encoder = pre["net"].encoder(cfg.finetune.encoder)
            loss = pre["final_pretrain_loss"]
            print(f"         loss {loss:.4f}, target spread {pre['final_target_std']:.3f}, "
                  f"k-NN proxy {pre['history'][-1].get('knn_proxy_top1', float('nan')):.3f}")
            if not np.isfinite(loss):
                results.append(("pretrain loss finite", False, float("nan"), 0.0))
                print("FAIL  pretrain loss is not finite")
            state = {k: v.detach().cpu().clone() for k, v in encoder.state_dict().items()}
            splits = load_splits(cfg.data)
            n_probe = len(splits["train"]) + len(splits["test"])
            pr = phase("probes", lambda: probes(encoder, splits, cfg, pre_session.device, session=pre_session),
                       n_probe, results)
            if pr is not None:
                print("         " + ", ".join(f"{k} {v:.3f}" for k, v in pr.items()))
            ft = phase("finetune", lambda: finetune(cfg, ft_session, state), n_train, results)
            if ft is not None:
                print(f"         top-1 test {ft['finetune_top1']:.3f}, val {ft['finetune_val_top1']:.3f}")
        if cuda:
            print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GiB")
        if cfg.pretrain.compile in CUDA_GRAPH_MODES:  # (a fallback is silent but for this count)
            from torch._dynamo.utils import counters
            print(f"CUDA graphs skipped {counters['inductor']['cudagraph_skips']} times (0: every compiled graph "
                  f"ran as a CUDA graph)")
    finally:
        dist.destroy_process_group()
    ok = bool(results) and all(r[1] for r in results) and len(results) >= 3
    print("RESULT", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
