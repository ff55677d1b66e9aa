"""Evaluation: frozen-feature proxies (linear probe, k-NN) of a pre-trained encoder, and the
top-1 of a classifier. Features and logits are computed under the fine-tuning's autocast.

The probes scale with the trial's workers: the images are cut into fixed batches, each rank
extracts the features of a contiguous run of them (with ``data.num_workers`` loader processes),
and an all-gather hands every rank the whole set in the original order -- the same numbers one
rank computes alone, since every image goes through the same batch whatever the world size. Each
rank then fits the same probes on its own device: nothing waits in a collective while one rank
works alone (the old design's 30-75 min barrier at ImageNet size, beyond any collective timeout).

Probe protocol (``eval.probe_train_per_class``): the k-NN bank and the linear probe's training set
are the whole training split, or a fixed class-balanced subset of it drawn from a constant seed
(the same images in every trial and seed); the test split is always whole."""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from conmim.data.sampler import batches
from conmim.data.sources import labelled_subset
from conmim.data.transforms import EvalTransform
from conmim.train.session import Session, autocast

PROBE_SUBSET_SEED = 0x9B0BE  # the probes' training subset never changes with the experiment's seed


def probe_train_set(train, cfg):
    """The k-NN bank / linear probe's training images: ``eval.probe_train_per_class`` of every class
    (a fixed draw), or the whole split."""
    n = cfg.eval.probe_train_per_class
    return train if n is None else train.take(labelled_subset(train.labels, n, PROBE_SUBSET_SEED))


class _EvalBatch:
    """(epoch, indices) -> the images resized and normalised: a loader worker's task (picklable, for
    loader workers started by spawn)."""

    def __init__(self, images, size: int):
        self.images, self.size = images, size
        self.tf = EvalTransform(size, images.mean, images.std)

    def __call__(self, _, index):
        return self.tf(self.images.batch(index, self.size))


@torch.no_grad()
def extract(encoder: nn.Module, images, cfg, device, batch_size: int = 512, session: Session | None = None
            ) -> torch.Tensor:
    """Mean-pooled patch tokens of the frozen encoder, [N, D] float32 on ``device``, in the order of
    ``images``. With a ``session`` whose collectives run, each rank computes a contiguous run of the
    fixed batches and the rows are all-gathered (every rank gets all N)."""
    rank, world = (session.rank, session.world) if session is not None and session.collectives else (0, 1)
    device = torch.device(device)
    starts = np.arange(0, len(images), batch_size)
    runs = np.array_split(np.arange(len(starts)), world)  # rank r: the batches runs[r]
    counts = [int(sum(min(batch_size, len(images) - starts[b]) for b in run)) for run in runs]
    make = _EvalBatch(images, cfg.model.img_size)
    items = [(0, np.arange(starts[b], min(starts[b] + batch_size, len(images)))) for b in runs[rank]]
    was_training = encoder.training
    encoder.eval()
    out = [torch.zeros(0, encoder.embed_dim, device=device)]
    for x in batches(make, items, cfg.data.num_workers if items else 0, pin_memory=device.type == "cuda"):
        with autocast(device, cfg.finetune.amp):
            tokens = encoder(x.to(device, non_blocking=True))
        out.append(tokens[:, 1:].float().mean(1))
    encoder.train(was_training)
    mine = torch.cat(out)
    return session.gather_rows(mine, counts) if world > 1 else mine


def knn_top1(train_f: torch.Tensor, train_y, test_f: torch.Tensor, test_y, k: int = 20, T: float = 0.07,
             num_classes: int | None = None) -> float:
    """Weighted k-NN on cosine similarity (DINO's protocol), on the features' device."""
    train_y = torch.as_tensor(train_y).to(train_f.device)
    test_y = torch.as_tensor(test_y).to(test_f.device)
    C = num_classes or int(train_y.max()) + 1
    a, b = F.normalize(train_f, dim=1), F.normalize(test_f, dim=1)
    k = min(k, len(a))
    correct = 0
    for i in range(0, len(b), 1024):
        sim = b[i: i + 1024] @ a.t()
        top, idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(top), C, device=top.device).scatter_add_(1, train_y[idx], (top / T).exp())
        correct += (votes.argmax(1) == test_y[i: i + 1024]).sum().item()
    return correct / len(b)


def linear_probe_top1(train_f, train_y, test_f, test_y, num_classes: int, epochs: int = 30, seed: int = 0) -> float:
    """A linear classifier on standardised frozen features (AdamW, cosine lr), on the features' device
    (the order of the mini-batches from a CPU generator: the same on any device)."""
    g = torch.Generator().manual_seed(seed)
    mu, sd = train_f.mean(0), train_f.std(0) + 1e-6
    xtr, xte = (train_f - mu) / sd, (test_f - mu) / sd
    ytr, yte = torch.as_tensor(train_y).to(xtr.device), torch.as_tensor(test_y).to(xte.device)
    head = nn.Linear(xtr.shape[1], num_classes).to(xtr.device)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=1e-4)
    bs = 256
    steps = epochs * max(1, -(-len(xtr) // bs))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(epochs):
        perm = torch.randperm(len(xtr), generator=g).to(xtr.device)
        for i in range(0, len(xtr), bs):
            j = perm[i: i + bs]
            loss = F.cross_entropy(head(xtr[j]), ytr[j])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        return (head(xte).argmax(1) == yte).float().mean().item()


def knn_top1_of(encoder, train, val, cfg, device, session: Session | None = None) -> float:
    n = min(len(train), 10000)  # a proxy: a bounded bank keeps it cheap at any scale
    bank = train.take(np.arange(n))
    return knn_top1(extract(encoder, bank, cfg, device, session=session), bank.labels,
                    extract(encoder, val, cfg, device, session=session), val.labels, cfg.eval.knn_k,
                    num_classes=train.num_classes)


def probes(encoder, splits, cfg, device, name: str = "", session: Session | None = None) -> dict:
    """k-NN and linear-probe top-1 on the test split, from frozen features: ``knn_top1`` and
    ``linear_probe_top1``, or ``knn_{name}_top1`` ... for a named encoder (``online``). With a
    ``session``, the features are extracted by all its ranks (:func:`extract`) and every rank fits."""
    out = {}
    if not (cfg.eval.knn or cfg.eval.linear_probe) or not cfg.eval.test_split:  # (they report on the test split)
        return out
    tag = f"_{name}" if name else ""
    train, test = probe_train_set(splits["train"], cfg), splits["test"]
    t0 = time.time()
    ftr = extract(encoder, train, cfg, device, session=session)
    fte = extract(encoder, test, cfg, device, session=session)
    if session is not None:
        session.log(f"[probe] {name or 'encoder'}: features of {len(train)} training + {len(test)} test images "
                    f"on {session.world} rank(s) in {time.time() - t0:.1f}s")
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
