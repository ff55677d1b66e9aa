"""The ConMIM pre-training step of ViT-B/16 (BEiT, the `vit-b16-imagenet` preset) at 224², bf16, on
one NVIDIA GPU: the step alone on pre-made tensors, and the project's real loop (`pretrain()`:
JPEG decoding and cropping in loader workers, the views on the GPU) on a generated ImageFolder at
the same batch, in one run. Prints both images/s, their ratio, and MFU against a bf16 matmul
measured in the same run.

For a bare GPU box: torch, timm, pydantic and pyyaml are enough (it imports `conmim` from the
checkout; no Ray, no MLflow).

    python benchmarks/gpu_step.py [--batch 64] [--steps 30] [--workers 12[,8...]] [--compile [MODE[,MODE]]]
        [--pretrain-attention flex,sdpa] [--profile] [--data DIR]
    python benchmarks/gpu_step.py --flops-only     # no GPU: FLOPs per image and the paper-scale cost
"""
from __future__ import annotations

import argparse
import os
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


def config(root: Path, batch: int, workers: int, epochs: int, sets: list[str], compile_: str, attention: str = "sdpa"):
    from conmim.config import load_config
    return load_config("vit-b16-imagenet", [
        f"data.root={root}", "data.val_size=8", f"data.num_workers={workers}", f"pretrain.epochs={epochs}",
        f"pretrain.batch_size={batch}", f"pretrain.lr_batch_size={batch}", "pretrain.warmup_epochs=0",
        "pretrain.checkpoint_every=1000", "eval.proxy_every=0", "resources.num_workers=1",
        f"pretrain.compile={compile_}", f"pretrain.attention={attention}", *sets], check_paths=False)


def step_alone(cfg, dev, steps: int, profile: bool = False):
    """images/s and FLOPs of the step (forward, backward, clipping, AdamW, EMA) on pre-made device
    tensors, built and optimised as `pretrain()` does."""
    from conmim.method.vit import param_groups
    from conmim.train.build import adamw, build_conmim, compiled, mark_step_begin
    p = cfg.pretrain
    net = build_conmim(cfg).to(dev)
    model = compiled(net, p.compile)
    opt = adamw(param_groups(net.online, p.weight_decay), p.lr, dev, betas=tuple(p.betas))
    B, S, P = p.batch_size, cfg.model.img_size, cfg.model.grid ** 2
    xo, xt = torch.randn(B, 3, S, S, device=dev), torch.randn(B, 3, S, S, device=dev)
    mask = torch.zeros(B, P, dtype=torch.bool, device=dev)
    mask[:, torch.randperm(P)[:net.rows]] = True

    def step(m):
        mark_step_begin(p.compile if m is model else False)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=p.amp):
            loss_sum, _ = m(xo, xt, mask, mask)
        loss = loss_sum / (B * net.rows)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(net.online.parameters(), p.clip_grad or float("inf"))
        opt.step()
        net.update_momentum(0.996)

    with FlopCounterMode(display=False) as fc:  # on the eager module: a compiled one hides its ops
        step(net)
    t = time.perf_counter()
    for _ in range(5):
        step(model)
    sync(dev)
    print(f"  (step alone: warm-up of 5 steps {time.perf_counter() - t:.1f} s)", flush=True)
    t = time.perf_counter()
    for _ in range(steps):
        step(model)
    sync(dev)
    rate = B * steps / (time.perf_counter() - t)
    if profile:
        print_profile(lambda: step(model), dev)
    return rate, fc.get_total_flops()


def print_profile(fn, dev, steps: int = 5, rows: int = 30):
    """Where a step's device time goes: the kernels by total time, and the step's wall vs busy time."""
    with torch.profiler.profile(activities=activities(dev)) as prof:
        for _ in range(steps):
            fn()
        sync(dev)
    ka = prof.key_averages()
    key = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    print(ka.table(sort_by=key, row_limit=rows, max_name_column_width=70), flush=True)


def activities(dev) -> list:
    from torch.profiler import ProfilerActivity
    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])


def data_alone(cfg, dev, steps: int):
    """images/s of the real loop's data without the step: the loader workers' batches copied to
    the device and the two views made there, as `pretrain()` makes them; timed after the workers'
    prefetched batches are used up (more epochs over the same images: the same work per batch)."""
    from conmim.data.sources import load_splits
    from conmim.data.transforms import TwoViewTransform
    from conmim.train.build import compiled_views, mask_generator
    from conmim.train.pretrain import _batches
    from conmim.train.session import LocalSession
    cfg = cfg.model_copy(update={"pretrain": cfg.pretrain.model_copy(update={"epochs": 100})})
    train = load_splits(cfg.data)["train"]
    session = LocalSession(Path(tempfile.mkdtemp(prefix="conmim-gpu-data-")), "pretrain", str(dev))
    transform = TwoViewTransform(cfg.augment, cfg.objective.perturbation, cfg.model.img_size,
                                 train.mean, train.std, cfg.seed, geometry=train.fixed_size)
    views = compiled_views(transform, cfg.pretrain.compile)
    loader = iter(_batches(cfg, train, transform, mask_generator(cfg), session, 0))
    skip = 5 * max(1, cfg.data.num_workers)  # (a DataLoader keeps 4 batches per worker in flight)
    n = t = 0
    for i, batch in enumerate(loader):
        if i == skip:
            sync(dev)
            t = time.perf_counter()
        images, params, mask = session.to_device(batch)
        made = views(images, params)
        n += images.shape[0] if i >= skip else 0
        if i == skip + steps - 1:
            break
    sync(dev)
    del made
    return n / (time.perf_counter() - t)


def real_loop(cfg, dev, profile: bool = False):
    """images/s of `pretrain()` in its last two epochs: the first carries the warm-up (and the
    compilation), and by the third the workers' prefetched batches are used up. ``profile``: also
    where 10 steps of the third epoch spend their time (host ops, device kernels, device idle)."""
    from conmim.train import faults
    from conmim.train.pretrain import pretrain
    from conmim.train.session import LocalSession
    prof, stamps, after_step = None, [], faults.after_step
    if profile:
        from conmim.data.sources import load_splits
        steps_per_epoch = len(load_splits(cfg.data)["train"]) // cfg.pretrain.batch_size
        start = 2 * steps_per_epoch + steps_per_epoch // 3
        prof = torch.profiler.profile(activities=activities(dev),
                                      schedule=torch.profiler.schedule(wait=start, warmup=3, active=10, repeat=1))

        def stepped(cfg_, out_dir, rank, step):  # (pretrain's per-step hook: the profiler's clock)
            after_step(cfg_, out_dir, rank, step)
            prof.step()
            if step in (start + 3, start + 13):  # (the window's ends only: a sync per step would stop the host running ahead)
                sync(dev)
                stamps.append(time.perf_counter())
        faults.after_step = stepped
        prof.start()
    try:
        res = pretrain(cfg, LocalSession(Path(tempfile.mkdtemp(prefix="conmim-gpu-step-")), "pretrain", str(dev)))
    finally:
        faults.after_step = after_step
        if prof is not None:
            prof.stop()
    if prof is not None and len(stamps) > 1:
        wall = (stamps[-1] - stamps[0]) / 10 * 1e3
        ka = prof.key_averages()
        cpu = sorted(ka, key=lambda e: -e.self_cpu_time_total)[:15]
        print(f"  real loop, 10 profiled steps: {wall:.1f} ms wall per step (the profiler slows the host)", flush=True)
        if dev.type == "cuda":
            # (kernels only, as the table's "Self CUDA time total" counts them)
            busy = sum(e.self_device_time_total for e in ka if e.device_type == torch.autograd.DeviceType.CUDA) / 10 / 1e3
            print(f"  device kernels {busy:.1f} ms per step: the device idles {max(0.0, 1 - busy / wall):.0%} "
                  f"of the step", flush=True)
            print(ka.table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=60), flush=True)
        print("  host ops by self CPU time (10 steps):", flush=True)
        for e in cpu:
            print(f"    {e.self_cpu_time_total / 1e3:8.1f} ms  {e.count:6d}x  {e.key[:80]}", flush=True)
    last = res["history"][-2:]
    return (last[-1]["step"] - res["history"][-3]["step"]) * cfg.pretrain.batch_size / sum(h["epoch_seconds"] for h in last)


def host_syncs(fn, dev):
    """``fn()``, and the places (file:line -> count) where it made the host wait for the GPU
    (CUDA's sync debug mode; it sees copies from the host and read-backs)."""
    if dev.type != "cuda":
        return fn(), {}
    import collections
    import warnings
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            out = fn()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return out, collections.Counter(f"{Path(w.filename).parent.name}/{Path(w.filename).name}:{w.lineno}"
                                    for w in seen if "synchroniz" in str(w.message))


class _NoCache(dict):
    """Makes `conmim.data.constants.like` copy every constant from the host on every call, as the
    views did before (to measure what those copies cost in the same run)."""

    def __setitem__(self, key, value):
        pass


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


def attention_backends(dev, B=64, H=12, N=197, d=64, iters=20):
    """BEiT's attention at ViT-B/16 224² (a learned bias on the scores, with its gradient): forward +
    backward per SDPA backend, and how far each is from the memory-efficient kernel (the default)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F
    from conmim.method.attention import flex_biased_attention
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(B, H, N, d, device=dev, dtype=torch.bfloat16, generator=g).requires_grad_() for _ in range(3))
    bias = (torch.randn(1, H, N, N, device=dev, dtype=torch.bfloat16, generator=g) * 0.5).requires_grad_()
    dout = torch.randn(B, H, N, d, device=dev, dtype=torch.bfloat16, generator=g)

    def explicit(q, k, v, bias):
        return ((q * d ** -0.5) @ k.transpose(-2, -1) + bias).softmax(-1) @ v

    variants = {name: (lambda b=b: sdpa_kernel([b])) for name, b in (
        ("mem-efficient", SDPBackend.EFFICIENT_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
        ("math", SDPBackend.MATH))}
    ref = None
    for name in [*variants, "explicit, compiled", "flex, compiled"]:
        fn = torch.compile(explicit) if name == "explicit, compiled" else \
            torch.compile(flex_biased_attention) if name == "flex, compiled" else \
            (lambda q, k, v, b: F.scaled_dot_product_attention(q, k, v, attn_mask=b))
        ctx = variants.get(name, lambda: torch.enable_grad())
        try:
            def once():
                with ctx():
                    out = fn(q, k, v, bias)
                return out, torch.autograd.grad(out, (q, k, v, bias), dout)
            for _ in range(3):
                res = once()
            sync(dev)
            t = time.perf_counter()
            for _ in range(iters):
                once()
            sync(dev)
            ms = (time.perf_counter() - t) / iters * 1e3
        except Exception as e:  # noqa: BLE001 - a backend that refuses these inputs says why
            print(f"attention {name:<20} refused: {str(e).splitlines()[0][:150]}", flush=True)
            continue
        ref = ref or res
        err = max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item() for a, b in
                  zip((res[0], *res[1]), (ref[0], *ref[1])))
        print(f"attention {name:<20} {ms:7.3f} ms fwd+bwd per layer; max rel. diff vs the first above "
              f"(out, dq, dk, dv, dbias) {err:.1e}", flush=True)


def cudagraph_skips():
    """Counts the graphs Inductor ran without CUDA graphs under a CUDA-graph mode (e.g. "skipping
    cudagraphs due to mutated inputs"), and keeps its reasons: a mode that silently fell back
    would otherwise look like a mode that does not help."""
    import logging
    from torch._dynamo.utils import counters
    from torch._inductor import cudagraph_utils

    class Skips(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages, self.start = [], 0

        def emit(self, record):
            self.messages.append(record.getMessage())

        def count(self) -> int:
            return counters["inductor"]["cudagraph_skips"] - self.start

        def clear(self):
            self.messages.clear()
            self.start = counters["inductor"]["cudagraph_skips"]

    h = Skips()
    h.clear()
    cudagraph_utils.cudagraphs_log.addHandler(h)
    return h


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
    ap.add_argument("--workers", default="12", help="data.num_workers of the real loop; several, comma-separated "
                    "(e.g. 12,8): the data alone and the real loop once per count, against the same step alone")
    ap.add_argument("--compile", nargs="?", const="true", default="false", metavar="MODE[,MODE]",
                    help="pretrain.compile: alone = true (Inductor's default mode), or reduce-overhead (CUDA graphs), "
                    "max-autotune, max-autotune-no-cudagraphs, false; several, comma-separated: each measured in turn "
                    "in this process (e.g. false,true,reduce-overhead)")
    ap.add_argument("--profile", action="store_true", help="print the step alone's kernels by device time")
    ap.add_argument("--compare-host-copies", action="store_true",
                    help="run the real loop again with the views' constants copied from the host per step")
    ap.add_argument("--loop-profile", action="store_true", help="also profile 10 steps of the real loop")
    ap.add_argument("--attention", action="store_true", help="only: BEiT's attention per SDPA backend")
    ap.add_argument("--pretrain-attention", default="sdpa", metavar="IMPL[,IMPL]",
                    help="pretrain.attention: sdpa (default) or flex (FlexAttention, compiled modes only); several, "
                    "comma-separated: each compile mode measured with each, in this order (e.g. flex,sdpa)")
    ap.add_argument("--data", help="folder for the JPEG ImageFolder (reused if it holds enough images)")
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
    if a.attention:
        return attention_backends(dev)
    t0 = time.perf_counter()
    root = jpeg_folder(Path(a.data) if a.data else Path(tempfile.mkdtemp(prefix="conmim-jpegs-")), a.steps * a.batch)
    print(f"  ({a.steps * a.batch} JPEGs in {root}: {time.perf_counter() - t0:.1f} s)", flush=True)
    from conmim.config.experiment import CUDA_GRAPH_MODES
    workers, modes = [int(w) for w in a.workers.split(",")], a.compile.split(",")
    cfg = config(root, a.batch, workers[0], 4, a.sets, modes[0])
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    print(f"device            {name}; torch {torch.__version__}; batch {a.batch}, bf16 autocast {cfg.pretrain.amp}, "
          f"{cfg.model.name} {cfg.model.img_size}^2", flush=True)
    peak = matmul_peak(dev, torch.bfloat16 if dev.type == "cuda" else torch.float32, 8192 if dev.type == "cuda" else 1024)
    print(f"matmul peak       {peak / 1e12:.1f} TFLOP/s (measured here)", flush=True)
    rows, skipped = [], cudagraph_skips()
    header = ("| pretrain.compile | attention | workers | step alone, images/s | MFU | data alone | real loop | "
              "real / alone | peak GiB |\n|---|---|---|---|---|---|---|---|---|")
    variants = [(m, i) for m in modes for i in a.pretrain_attention.split(",") if not (i == "flex" and m == "false")]
    for mode, impl in variants:  # (one process: the same machine, the same JPEGs, for every variant)
        torch._dynamo.reset()  # (each compiles afresh, within Dynamo's recompile limit)
        skipped.clear()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        cfg = config(root, a.batch, workers[0], 4, a.sets, mode, impl)
        print(f"-- pretrain.compile={cfg.pretrain.compile}, pretrain.attention={impl}", flush=True)
        got = attempt("step alone", lambda: host_syncs(lambda: step_alone(cfg, dev, a.steps, a.profile), dev))
        if got is None:
            continue
        (alone, flops), syncs = got
        per_image = flops / a.batch
        print(f"model FLOPs/image {per_image / 1e9:.1f} GFLOP", flush=True)
        print(f"step alone        {alone:8.1f} images/s  (MFU {alone * per_image / peak:.3f})", flush=True)
        print_syncs("step alone", syncs, a.steps + 6)
        for w in workers:
            cfg = config(root, a.batch, w, 4, a.sets, mode, impl)
            data = attempt("data alone", lambda: data_alone(cfg, dev, 2 * a.steps))
            if data is None:
                continue
            print(f"data alone        {data:8.1f} images/s  (data.num_workers={w}: loader workers + copy + views on the "
                  f"device, no step)", flush=True)
            got = attempt("real loop", lambda: host_syncs(lambda: real_loop(cfg, dev), dev))
            if got is None:
                continue
            loop, syncs = got
            print(f"real loop         {loop:8.1f} images/s  (data.num_workers={w}, JPEG ImageFolder)", flush=True)
            print(f"real / alone      {loop / alone:.3f}  (data.num_workers={w})", flush=True)
            print_syncs("real loop", syncs, cfg.pretrain.epochs * (a.steps - 1))
            memory = torch.cuda.max_memory_allocated() / 2 ** 30 if dev.type == "cuda" else float("nan")
            rows.append((cfg.pretrain.compile, impl, w, alone, alone * per_image / peak, data, loop, loop / alone, memory))
            print(header.split("\n")[0] + "\n" + row(rows[-1]), flush=True)  # (each as it comes: a timeout keeps them)
        if cfg.pretrain.compile in CUDA_GRAPH_MODES:  # (Inductor falls back without CUDA graphs, and says so only here)
            print(f"CUDA graphs       skipped {skipped.count()} times in this variant" +
                  "".join(f"\n    {m}" for m in sorted(set(skipped.messages))[:8]), flush=True)
    print("\n" + header)
    for r in rows:
        print(row(r), flush=True)
    if a.compare_host_copies:
        from conmim.data import constants
        cached, constants._ON_DEVICE = constants._ON_DEVICE, _NoCache()
        old, syncs = host_syncs(lambda: real_loop(cfg, dev), dev)
        constants._ON_DEVICE = cached
        print(f"real loop, a host copy per constant per step (as before): {old:.1f} images/s "
              f"({old / alone:.3f} of the step alone)", flush=True)
        print_syncs("loop with host copies", syncs, cfg.pretrain.epochs * (a.steps - 1))
    if a.loop_profile:  # (a run of its own: the profiler slows the host)
        real_loop(cfg, dev, profile=True)


def attempt(what: str, fn):
    """fn(), or None once it has said why it failed (e.g. a kernel this torch cannot build), so that
    one variant failing leaves the others of the same call measured."""
    import traceback
    try:
        return fn()
    except Exception as e:  # noqa: BLE001
        tb = traceback.format_exc().strip().splitlines()
        print(f"{what} failed: {type(e).__name__}\n    " + "\n    ".join(tb[-12:]), flush=True)
        return None


def row(r: tuple) -> str:
    return "| {} | {} | {} | {:.1f} | {:.3f} | {:.0f} | {:.1f} | **{:.3f}** | {:.1f} |".format(*r)


def print_syncs(what: str, places: dict, steps: int):
    total = sum(places.values())
    print(f"host waits        {total} in the {what} (~{steps} steps)" + ("" if total else " (none)"), flush=True)
    for place, n in sorted(places.items(), key=lambda kv: -kv[1])[:12]:
        print(f"    {n:6d}  {place}", flush=True)

def jpeg_folder(root: Path, n: int) -> Path:
    """The ImageFolder of n 500x375 training JPEGs, written in parallel, or reused when ``root``
    holds it already (one folder for several runs of this script)."""
    from concurrent.futures import ProcessPoolExecutor
    from input_pipeline import write_jpegs
    if len(list(root.glob("train/*/*.jpg"))) >= n:
        return root
    parts = min(16, os.cpu_count() or 1, max(1, n // 64))
    with ProcessPoolExecutor(parts) as pool:
        list(pool.map(write_jpegs, [root] * parts, [n] * parts, [8] * parts, [(500, 375)] * parts,
                      range(parts), [parts] * parts))
    return root

if __name__ == "__main__":
    main()
