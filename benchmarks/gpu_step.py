"""ConMIM pre-training step of ViT-B/16 at 224², bf16, batch 64, on one NVIDIA GPU.

Self-contained on purpose (torch + timm only, no Ray, no conmim install) so it runs on a bare
GPU box:  python benchmarks/gpu_step.py [--batch 64] [--steps 30] [--compile]

Prints images/s and MFU: model FLOPs per step (counted by torch's FlopCounterMode) / step time,
over the FLOP/s of a large bf16 matmul measured in the same run.
"""
import argparse
import copy
import time

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        # global_pool="": the final LayerNorm is `norm` (with timm's default "avg" it would be the
        # pooling head's fc_norm, and `norm` an Identity): the reference normalises every token
        self.vit = timm.create_model("beit_base_patch16_224", pretrained=False, num_classes=0, init_values=0.1,
                                     global_pool="", use_shared_rel_pos_bias=True, use_abs_pos_emb=False,
                                     use_rel_pos_bias=False)
        assert isinstance(self.vit.norm, nn.LayerNorm)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 768))
        self.proj = nn.Sequential(nn.Linear(768, 4096, bias=False), nn.BatchNorm1d(4096), nn.ReLU(True),
                                  nn.Linear(4096, 4096, bias=False), nn.BatchNorm1d(4096), nn.ReLU(True),
                                  nn.Linear(4096, 256, bias=False), nn.BatchNorm1d(256, affine=False))

    def forward(self, x, mask=None):
        v = self.vit
        x = v.patch_embed(x)
        if mask is not None:
            x = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        x = torch.cat((v.cls_token.expand(x.shape[0], -1, -1), x), 1)
        rel = v.rel_pos_bias()
        for blk in v.blocks:
            x = blk(x, shared_rel_pos_bias=rel)
        x = v.norm(x)[:, 1:]
        B, P, D = x.shape
        return self.proj(x.reshape(B * P, D)).view(B, P, -1)


def loss_fn(q, k, mask, tau=0.1):
    q, k = F.normalize(q.float(), dim=-1), F.normalize(k.float(), dim=-1)
    b, p = mask.nonzero(as_tuple=True)
    return F.cross_entropy(torch.bmm(q, k.transpose(1, 2))[b, p] / tau, p)


def count_flops(tflops: float, batch: int = 2):
    """FLOPs of one ConMIM step per image (online fwd+bwd on the masked view, momentum fwd on the
    full view), counted on the CPU; then the GPU-hours of the reference recipes at `tflops`."""
    online = Net()
    ema = copy.deepcopy(online).requires_grad_(False)
    xo, xt = torch.randn(batch, 3, 224, 224), torch.randn(batch, 3, 224, 224)
    mask = torch.zeros(batch, 196, dtype=torch.bool)
    mask[:, torch.randperm(196)[:75]] = True
    with FlopCounterMode(display=False) as fc:
        q = online(xo, mask)
        with torch.no_grad():
            k = ema(xt)
        loss_fn(q, k, mask).backward()
    per_image = fc.get_total_flops() / batch
    with FlopCounterMode(display=False) as fc:  # fine-tuning: the encoder alone, forward + backward
        online.vit.forward_features(xt).float().mean().backward()
    ft_image = fc.get_total_flops() / batch
    print(f"model FLOPs/image/step  {per_image / 1e9:.1f} GFLOP (pre-training, ViT-B/16 224^2)")
    print(f"assumed throughput      {tflops:.1f} TFLOP/s per GPU -> {tflops * 1e12 / per_image:.0f} images/s")
    for epochs in (300, 800, 1600):
        hours = per_image * 1_281_167 * epochs / (tflops * 1e12) / 3600
        print(f"ImageNet-1K x {epochs:4d} epochs  {hours:7.0f} GPU-hours ({hours / 8:.0f} h on 8 GPUs)")
    ft_hours = ft_image * 1_281_167 * 100 / (tflops * 1e12) / 3600
    print(f"fine-tune FLOPs/image   {ft_image / 1e9:.1f} GFLOP; 100 epochs: {ft_hours:.0f} GPU-hours")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--flops-only", action="store_true",
                    help="count the model FLOPs of one step on the CPU (batch 2) and print the paper-scale "
                         "cost for an assumed sustained TFLOP/s; needs no GPU")
    ap.add_argument("--assume-tflops", type=float, default=989.4 * 0.4,
                    help="with --flops-only: sustained bf16 TFLOP/s per GPU (default: H100 SXM dense bf16 "
                         "peak 989.4 from NVIDIA's datasheet x an assumed MFU of 0.40)")
    a = ap.parse_args()
    if a.flops_only:
        return count_flops(a.assume_tflops)
    assert torch.cuda.is_available(), "needs an NVIDIA GPU"
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    online = Net().to(dev)
    ema = copy.deepcopy(online).requires_grad_(False)
    opt = torch.optim.AdamW(online.parameters(), lr=5e-4, betas=(0.9, 0.98), weight_decay=0.05, fused=True)
    B = a.batch
    xo, xt = torch.randn(B, 3, 224, 224, device=dev), torch.randn(B, 3, 224, 224, device=dev)
    mask = torch.zeros(B, 196, dtype=torch.bool, device=dev)
    mask[:, torch.randperm(196)[:75]] = True
    fwd = torch.compile(online) if a.compile else online
    ema_f = torch.compile(ema) if a.compile else ema
    qp, kp = list(online.parameters()), list(ema.parameters())

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            q = fwd(xo, mask)
            with torch.no_grad():
                k = ema_f(xt)
        loss = loss_fn(q, k, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(kp, qp, 1 - 0.996)

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    with FlopCounterMode(display=False) as fc:
        step()
    flops = fc.get_total_flops()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(a.steps):
        step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / a.steps

    n = 8192
    x, y = torch.randn(n, n, device=dev, dtype=torch.bfloat16), torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        x @ y
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        x @ y
    torch.cuda.synchronize()
    peak = 2 * n ** 3 * 20 / (time.perf_counter() - t)
    print(f"device            {torch.cuda.get_device_name()}")
    print(f"batch             {B} (bf16 autocast{', compiled' if a.compile else ''})")
    print(f"step time         {dt * 1e3:.1f} ms")
    print(f"images/s          {B / dt:.1f}")
    print(f"model FLOPs/step  {flops / 1e12:.3f} TFLOP")
    print(f"achieved          {flops / dt / 1e12:.1f} TFLOP/s")
    print(f"bf16 matmul peak  {peak / 1e12:.1f} TFLOP/s (8192^3, measured)")
    print(f"MFU               {flops / dt / peak:.3f}")
    print(f"peak GPU memory   {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
