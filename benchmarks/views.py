"""The two views of a pre-training batch, eager against compiled (what `pretrain.compile` does to
them since the fifth round of issue 14), on one device, interleaved in one process: ms per batch
of each, their ratio, and how far the compiled views are from the eager ones.

On a GPU the views are ~150 small kernels, each a launch the training process's host pays for
(the compiled real loop is host-bound there); compiled, Inductor fuses them into a few. On the CPU
the fusion saves passes over memory instead.

    python benchmarks/views.py [--device cuda] [--batch 64] [--rounds 5]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def cases(batch: int, dev):
    """(name, uint8 batch, the TwoViewTransform of its preset): Fashion-MNIST's grey
    28² (one channel broadcast to three) and ImageNet's RGB at 224² already cropped by the loader."""
    from conmim.config import load_config
    from conmim.data.transforms import TwoViewTransform
    g = torch.Generator().manual_seed(0)
    tiny = load_config("tiny")
    grey = torch.randint(0, 256, (batch, 1, 28, 28), dtype=torch.uint8, generator=g).expand(-1, 3, -1, -1)
    b16 = load_config("vit-b16-imagenet", ["data.root=/nonexistent"], check_paths=False)
    rgb = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8, generator=g)
    return [
        ("tiny, grey 28^2, crop on the device", grey.to(dev),
         TwoViewTransform(tiny.augment, tiny.objective.perturbation, tiny.model.img_size, (0.29,) * 3, (0.35,) * 3, 0)),
        ("vit-b16, RGB 224^2 from the loader", rgb.to(dev),
         TwoViewTransform(b16.augment, b16.objective.perturbation, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 0,
                          geometry=False)),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds of 20 batches each way; best round kept")
    a = ap.parse_args()
    dev = torch.device(a.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    from conmim.train.build import compiled_views
    print(f"device {dev} ({torch.cuda.get_device_name() if dev.type == 'cuda' else f'{torch.get_num_threads()} threads'}), "
          f"torch {torch.__version__}, batch {a.batch}")
    for name, x, tf in cases(a.batch, dev):
        params = [tf.params(e, list(range(a.batch * e, a.batch * (e + 1))), x.shape[2], x.shape[3]) for e in range(4)]
        params = [p._replace(**{k: v.to(dev) for k, v in p._asdict().items() if v is not None}) for p in params]
        eager, fused = tf.views, compiled_views(tf, True)
        t = time.perf_counter()
        fused(x, params[0])
        sync()
        compile_s = time.perf_counter() - t
        diff = max((u - v).abs().max().item() for p in params for u, v in zip(eager(x, p), fused(x, p)))
        best = {"eager": float("inf"), "compiled": float("inf")}
        for _ in range(a.rounds):
            for kind, fn in (("eager", eager), ("compiled", fused)):
                sync()
                t = time.perf_counter()
                for i in range(20):
                    fn(x, params[i % 4])
                sync()
                best[kind] = min(best[kind], (time.perf_counter() - t) / 20 * 1e3)
        print(f"{name:<38} eager {best['eager']:7.2f} ms, compiled {best['compiled']:7.2f} ms per batch: "
              f"x{best['eager'] / best['compiled']:.2f}; max |difference| {diff:.1e}; compiled in {compile_s:.0f} s")


if __name__ == "__main__":
    main()
