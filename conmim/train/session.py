"""Where a training loop runs: in this process, or as a Ray Train worker. The loops talk only to
a Session, so the same code is the in-process path and the distributed one."""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist


class Session:
    rank = 0
    world = 1
    device = torch.device("cpu")
    # Run every collective (DDP, all-reduces, barriers) even in a one-process group: how the GPU
    # check and the tests exercise the multi-worker code paths with a single rank.
    force_collectives = False

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def collectives(self) -> bool:
        return self.world > 1 or self.force_collectives

    def report(self, metrics: dict, checkpoint_dir: Optional[str] = None) -> None:
        raise NotImplementedError

    def report_epoch(self, metrics: dict, save: Optional[Callable[[Path], object]] = None) -> None:
        """Report ``metrics``; with ``save``, rank 0 first writes a checkpoint into a temporary
        folder with it, which the report takes over (copies or uploads) before it is removed."""
        if save is None or not self.is_main:
            self.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="conmim-ckpt-") as d:
            save(Path(d))
            self.report(metrics, d)

    def to_device(self, batch):
        """A batch (tensors, possibly in lists and (named) tuples, None allowed) on this session's device,
        copied without waiting (from pinned memory, the copy overlaps the step)."""
        if isinstance(batch, torch.Tensor):
            return batch.to(self.device, non_blocking=True)
        if isinstance(batch, (tuple, list)):  # (a DataLoader hands a batch's tuple over as a list)
            moved = [self.to_device(b) for b in batch]
            return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
        return batch

    def autocast(self, enabled: bool):
        """bf16 autocast on this session's device when ``enabled`` (bf16 needs no loss scaler)."""
        return autocast(self.device, enabled)

    def latest_checkpoint(self) -> Iterator[Optional[Path]]:
        """``with session.latest_checkpoint() as d``: the folder of the checkpoint to restart
        from (None if there is none), readable inside the block only."""
        raise NotImplementedError

    def log(self, line: str) -> None:
        if self.is_main:
            print(line, file=sys.stderr, flush=True)  # progress on stderr, results on stdout

    # Collective helpers; no-ops in one process unless forced. They take tensors on the training
    # device: Ray Train gives GPU workers an NCCL-only process group, which has no backend for
    # CPU tensors. (A 'cpu:gloo,cuda:nccl' group would take both, but then a statistic reduced
    # on the CPU costs a device->host copy, a sync and a TCP round-trip per reduction, while on
    # the device it stays in the GPU's stream.)
    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type != self.device.type:
            raise RuntimeError(f"all_reduce_sum got a tensor on {t.device}; this session's process group takes "
                               f"tensors on {self.device} (NCCL has no backend for CPU tensors)")
        if self.collectives:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def ddp(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` under DistributedDataParallel when collectives run, else itself."""
        if not self.collectives:
            return module
        ids = None
        if self.device.type == "cuda":
            ids = [self.device.index if self.device.index is not None else torch.cuda.current_device()]
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)

    @staticmethod
    def no_sync(module: torch.nn.Module, skip: bool):
        """``with session.no_sync(model, skip)`` around a micro-batch's forward and backward: with
        ``skip`` (every micro-batch of an optimiser step but the last) DDP keeps the gradients
        local, and the last one's backward all-reduces their sum; a module without DDP: nothing."""
        if skip and isinstance(module, torch.nn.parallel.DistributedDataParallel):
            return module.no_sync()
        return nullcontext()

    def average_gradients(self, params) -> None:
        """One flat all-reduce of every gradient, divided by the number of workers."""
        grads = [p.grad for p in params if p.grad is not None]
        if not self.collectives or not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()

    def gather_rows(self, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Every rank's ``rows`` (rank r holds ``counts[r]`` of them, each rank knows all counts),
        concatenated in rank order, on every rank: one all-gather of equal, padded blocks."""
        if not self.collectives:
            return rows
        block = rows.new_zeros((max(counts), *rows.shape[1:]))
        block[: len(rows)] = rows
        parts = [torch.empty_like(block) for _ in range(self.world)]
        dist.all_gather(parts, block)
        return torch.cat([p[:c] for p, c in zip(parts, counts)])

    def barrier(self) -> None:
        if self.collectives:
            dist.barrier()


class LocalSession(Session):
    """One process; checkpoints in ``out_dir/checkpoints/<phase>/latest``. Inside a process group
    started by the caller (``torch.distributed.init_process_group``) it takes its rank and size
    from the group; ``force_collectives`` runs DDP and the all-reduces even with one rank."""

    def __init__(self, out_dir, phase: str, device: str = "cpu", force_collectives: bool = False):
        super().__init__(out_dir)
        self.phase = phase
        self.device = torch.device(device)
        self.force_collectives = force_collectives
        if dist.is_available() and dist.is_initialized():
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.ckpt_root = self.out_dir / "checkpoints" / phase
        self.history: list[dict] = []

    @property
    def checkpoint_dir(self) -> Path:
        """Where the latest checkpoint of this phase is (``conmim pretrain`` prints it)."""
        return self.ckpt_root / "latest"

    def report(self, metrics, checkpoint_dir=None):
        self.history.append(dict(metrics))
        if checkpoint_dir is not None:
            dst = self.checkpoint_dir
            tmp = self.ckpt_root / ".latest.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(checkpoint_dir, tmp)
            shutil.rmtree(dst, ignore_errors=True)
            tmp.rename(dst)  # atomic swap: a crash never leaves a half-written "latest"

    @contextmanager
    def latest_checkpoint(self):
        p = self.checkpoint_dir
        yield p if (p / "state.pt").exists() else None


class RaySession(Session):
    """Inside a Ray Train (V2) worker."""

    def __init__(self, out_dir):
        super().__init__(out_dir)
        import ray.train
        import ray.train.torch
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self._ckpt = ray.train.get_checkpoint()

    def report(self, metrics, checkpoint_dir=None):
        import ray.train
        ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt)

    def log(self, line: str) -> None:
        """Also into the trial's ``train.log`` (a sweep keeps the workers' output off its console)."""
        super().log(line)
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.out_dir / "train.log", "a") as f:
                f.write(line + "\n")

    @contextmanager
    def latest_checkpoint(self):
        if self._ckpt is None:
            yield None
            return
        # read in place from storage on a local or shared filesystem; from s3:// and the like, a
        # temporary copy that Ray deletes after the block (a copy per restart would fill /tmp at
        # paper scale, where a checkpoint is over a GB)
        with self._ckpt.as_directory() as d:
            yield Path(d)


def init_process_group(backend: str, init_method: str, rank: int, world_size: int, timeout_s: float) -> None:
    """A process group started by this project (not by Ray Train), whose collectives give up after
    ``timeout_s`` (``resources.collective_timeout_s``, as Ray Train's ``TorchConfig(timeout_s)``)."""
    from datetime import timedelta
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))


def micro_batches(batch, parts: int) -> list:
    """``batch`` (tensors in lists and (named) tuples, None allowed) cut along dim 0 into ``parts``
    equal, contiguous micro-batches (views, no copies)."""
    if parts == 1:
        return [batch]

    def cut(b, k: int):
        if isinstance(b, torch.Tensor):
            if b.shape[0] % parts:
                raise ValueError(f"a batch of {b.shape[0]} cannot be cut into {parts} equal micro-batches")
            n = b.shape[0] // parts
            return b[k * n: (k + 1) * n]
        if isinstance(b, (tuple, list)):
            items = [cut(x, k) for x in b]
            return type(b)(*items) if hasattr(b, "_fields") else type(b)(items)
        return b

    return [cut(batch, k) for k in range(parts)]


def set_threads(n: int) -> None:
    """torch's intra-op threads (``resources.threads``), for this process and any it starts."""
    torch.set_num_threads(int(n))
    os.environ["OMP_NUM_THREADS"] = str(int(n))


def undo_ray_nice() -> None:
    """Undo the low priority (nice 15) Ray gives its workers, which on a small machine lets every
    background Ray process preempt the training. (Not for ``--backend process``: a user who
    ``nice``s a run means it.)"""
    try:
        if os.getpriority(os.PRIO_PROCESS, 0) > 0:
            os.setpriority(os.PRIO_PROCESS, 0, 0)
    except (OSError, AttributeError):
        pass  # not allowed to raise priority (non-root): train at Ray's priority


def autocast(device: torch.device | str, enabled: bool):
    """bf16 autocast on ``device`` when ``enabled``."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=enabled)
