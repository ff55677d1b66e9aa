"""Evaluation: frozen-feature proxies (linear probe, k-NN) of a pre-trained encoder, and the
top-1 of a classifier. Features and logits are computed under the fine-tuning's autocast."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from conmim.data.transforms import EvalTransform
from conmim.train.session import Session, autocast


@torch.no_grad()
def extract(encoder: nn.Module, images, cfg, device, batch_size: int = 512) -> torch.Tensor:
    """Mean-pooled patch tokens of the frozen encoder, [N, D] on the CPU."""
    encoder.eval()
    tf = EvalTransform(cfg.model.img_size, images.mean, images.std)
    device = torch.device(device)
    out = []
    for i in range(0, len(images), batch_size):
        idx = np.arange(i, min(i + batch_size, len(images)))
        x = tf(images.batch(idx, cfg.model.img_size)).to(device, non_blocking=True)
        with autocast(device, cfg.finetune.amp):
            tokens = encoder(x)
        out.append(tokens[:, 1:].float().mean(1).cpu())
    encoder.train()
    return torch.cat(out)


def knn_top1(train_f: torch.Tensor, train_y, test_f: torch.Tensor, test_y, k: int = 20, T: float = 0.07,
             num_classes: int | None = None) -> float:
    """Weighted k-NN on cosine similarity (DINO's protocol)."""
    train_y = torch.as_tensor(train_y)
    test_y = torch.as_tensor(test_y)
    C = num_classes or int(train_y.max()) + 1
    a, b = F.normalize(train_f, dim=1), F.normalize(test_f, dim=1)
    k = min(k, len(a))
    correct = 0
    for i in range(0, len(b), 1024):
        sim = b[i: i + 1024] @ a.t()
        top, idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(top), C).scatter_add_(1, train_y[idx], (top / T).exp())
        correct += (votes.argmax(1) == test_y[i: i + 1024]).sum().item()
    return correct / len(b)


def linear_probe_top1(train_f, train_y, test_f, test_y, num_classes: int, epochs: int = 30, seed: int = 0) -> float:
    """A linear classifier on standardised frozen features (AdamW, cosine lr)."""
    g = torch.Generator().manual_seed(seed)
    mu, sd = train_f.mean(0), train_f.std(0) + 1e-6
    xtr, xte = (train_f - mu) / sd, (test_f - mu) / sd
    ytr, yte = torch.as_tensor(train_y), torch.as_tensor(test_y)
    head = nn.Linear(xtr.shape[1], num_classes)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=1e-4)
    bs = 256
    steps = epochs * max(1, -(-len(xtr) // bs))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(epochs):
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr), bs):
            j = perm[i: i + bs]
            loss = F.cross_entropy(head(xtr[j]), ytr[j])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        return (head(xte).argmax(1) == yte).float().mean().item()


def knn_top1_of(encoder, train, val, cfg, device) -> float:
    n = min(len(train), 10000)  # a proxy: a bounded bank keeps it cheap at any scale
    bank = train.take(np.arange(n))
    return knn_top1(extract(encoder, bank, cfg, device), bank.labels, extract(encoder, val, cfg, device),
                    val.labels, cfg.eval.knn_k, num_classes=train.num_classes)


def probes(encoder, splits, cfg, device, name: str = "") -> dict:
    """k-NN and linear-probe top-1 on the test split, from frozen features: ``knn_top1`` and
    ``linear_probe_top1``, or ``knn_{name}_top1`` ... for a named encoder (``online``)."""
    out = {}
    if not (cfg.eval.knn or cfg.eval.linear_probe):
        return out
    tag = f"_{name}" if name else ""
    train, test = splits["train"], splits["test"]
    ftr, fte = extract(encoder, train, cfg, device), extract(encoder, test, cfg, device)
    if cfg.eval.knn:
        out[f"knn{tag}_top1"] = knn_top1(ftr, train.labels, fte, test.labels, cfg.eval.knn_k,
                                         num_classes=train.num_classes)
    if cfg.eval.linear_probe:
        out[f"linear_probe{tag}_top1"] = linear_probe_top1(ftr, train.labels, fte, test.labels, train.num_classes,
                                                           cfg.eval.probe_epochs, cfg.seed)
    return out


@torch.no_grad()
def top1(model: nn.Module, images, cfg, session: Session, batch_size: int = 512) -> float:
    """Top-1 over ``images``, each worker scoring a disjoint slice."""
    model.eval()
    tf = EvalTransform(cfg.model.img_size, images.mean, images.std)
    idx = np.array_split(np.arange(len(images)), session.world)[session.rank]
    counts = torch.zeros(2, dtype=torch.float64, device=session.device)  # correct, seen
    for i in range(0, len(idx), batch_size):
        j = idx[i: i + batch_size]
        x = tf(images.batch(j, cfg.model.img_size)).to(session.device, non_blocking=True)
        y = torch.as_tensor(images.labels[j]).to(session.device, non_blocking=True)
        with session.autocast(cfg.finetune.amp):
            logits = model(x)
        counts[0] += (logits.argmax(1) == y).sum()
        counts[1] += len(j)
    model.train()
    tot = session.all_reduce_sum(counts)
    return (tot[0] / tot[1]).item()
