"""Paths that only a GPU run takes, checked on the CPU where the same mistake can be made:
collectives on host tensors (an NCCL group rejects them), the reference's final LayerNorm for
BEiT, the shared relative position bias untied for fine-tuning, checkpoints read onto another
device, benchmarks/gpu_check.py itself, and pretrain.compile (the step and the views compiled once)."""
import subprocess
import sys
from contextlib import contextmanager

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from conmim.config import load_config
from conmim.data.sources import load_splits
from conmim.method.vit import Classifier, embed_patches, param_groups
from conmim.train.build import build_encoder
from conmim.train.checkpoint import resumable
from conmim.train.finetune import finetune
from conmim.train.pretrain import pretrain
from conmim.train.session import LocalSession
from conftest import REPO


# ---------------------------------------------------------------------------------------------
# Collectives take tensors on the session's device
# ---------------------------------------------------------------------------------------------
class HostTensor(torch.Tensor):
    """A tensor that conmim's code put on the host: made without naming a device, or moved there
    with ``.cpu()``. On a GPU worker it is a CPU tensor, which an NCCL group cannot reduce. The
    subclass survives arithmetic (torch's default ``__torch_function__``), so a statistic built
    from it is one too; ``.to(device)`` (or ``.to(other_tensor)``) is the one way back."""


def _called_from_conmim() -> bool:
    # (module construction in conmim.method is left alone: weights move with the module's .to())
    name = sys._getframe(2).f_globals.get("__name__", "")
    return name.startswith("conmim") and not name.startswith("conmim.method")


@contextmanager
def host_tensors_marked():
    """While active, tensors that conmim code makes on the host become :class:`HostTensor`."""
    saved = {}

    def factory(name):
        fn = saved[name] = getattr(torch, name)

        def make(*a, **kw):
            t = fn(*a, **kw)
            return t.as_subclass(HostTensor) if "device" not in kw and _called_from_conmim() else t
        return make

    def cpu(self, *a, **kw):
        t = saved["cpu"](self, *a, **kw)
        return t.as_subclass(HostTensor) if _called_from_conmim() else t

    def to(self, *a, **kw):
        t = saved["to"](self, *a, **kw)
        names_device = any(isinstance(x, (str, torch.device, torch.Tensor)) for x in a) or "device" in kw
        return t.as_subclass(torch.Tensor) if names_device and isinstance(t, HostTensor) else t

    names = ("tensor", "as_tensor", "zeros", "ones", "full", "empty", "arange", "from_numpy")
    patched = {n: factory(n) for n in names}
    saved["cpu"], saved["to"] = torch.Tensor.cpu, torch.Tensor.to
    try:
        for n, f in patched.items():
            setattr(torch, n, f)
        torch.Tensor.cpu, torch.Tensor.to = cpu, to
        yield
    finally:
        for n in names:
            setattr(torch, n, saved[n])
        torch.Tensor.cpu, torch.Tensor.to = saved["cpu"], saved["to"]


class DeviceOnlySession(LocalSession):
    """A one-rank process group with every collective forced on, whose all-reduce refuses what an
    NCCL group refuses: tensors that are not on the training device."""

    def __init__(self, out_dir, phase):
        super().__init__(out_dir, phase, force_collectives=True)
        self.reduced = 0

    def all_reduce_sum(self, t):
        if isinstance(t, HostTensor):
            raise RuntimeError("No backend type associated with device type cpu (a host tensor reached a collective)")
        self.reduced += 1
        return super().all_reduce_sum(t)


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("accumulate", [1, 2])  # 2: micro-batches, DDP's no_sync for the first
def test_collectives_get_device_tensors_through_real_pretrain_and_finetune(small, tmp_path, one_rank_group, accumulate):
    # 4 steps an epoch: a read-back after step 2 and at the end
    cfg = small(pretrain__log_every=2, pretrain__accumulate=accumulate, finetune__accumulate=accumulate)
    load_splits(cfg.data)  # the dataset cache is filled outside the marking, as a Ray worker's would be
    pre_s, ft_s = DeviceOnlySession(tmp_path, "pretrain"), DeviceOnlySession(tmp_path, "finetune")
    with host_tensors_marked():
        pre = pretrain(cfg, pre_s)
        assert isinstance(pre["net"], nn.Module)
        encoder = pre["net"].encoder(cfg.finetune.encoder)
        ft = finetune(cfg, ft_s, {k: v.detach().clone() for k, v in encoder.state_dict().items()})
    # the loss statistics at each read-back (none per step); fine-tuning's test and val top-1
    assert pre_s.reduced == 2 and ft_s.reduced == 2
    assert 0 < ft["finetune_top1"] <= 1 and pre["final_pretrain_loss"] > 0


def test_the_marking_catches_a_host_tensor(tmp_path, one_rank_group):
    s = DeviceOnlySession(tmp_path, "pretrain")
    with host_tensors_marked():
        x = torch.ones(3, device=s.device)
        assert s.all_reduce_sum(x * 2).sum().item() == 6  # on the device: reduced
        ns = {"__name__": "conmim.fake", "torch": torch, "x": x}
        exec("a = x.cpu() + 1\nb = torch.tensor([1.0, 2.0]).double()", ns)  # noqa: S102 - code "from conmim"
        for t in (ns["a"], ns["b"]):
            with pytest.raises(RuntimeError, match="No backend type"):
                s.all_reduce_sum(t)


# ---------------------------------------------------------------------------------------------
# BEiT: the reference's final LayerNorm, and the shared relative position bias untied at fine-tuning
# ---------------------------------------------------------------------------------------------
BEIT_PRESETS = ["vit-b16-imagenet", "vit-s16-imagenet"]


def _beit(preset, **over):
    from conmim.config import build, load_source
    raw, label = load_source(preset)
    return build(raw, {"data.root": "/nonexistent", **over}, label=label, check_paths=False)


@pytest.mark.parametrize("preset", BEIT_PRESETS)
def test_beit_tokens_are_timms_forward_features_ending_in_layernorm(preset):
    cfg = _beit(preset)
    torch.manual_seed(0)
    m = build_encoder(cfg).eval()
    last = []
    for mod in m.modules():
        if not list(mod.children()):
            mod.register_forward_hook(lambda mod, i, o: last.append(mod))
    x = torch.randn(1, 3, cfg.model.img_size, cfg.model.img_size)
    with torch.no_grad():
        ours, theirs = m(x), m.vit.forward_features(x)
    assert isinstance(m.vit.norm, nn.LayerNorm) and isinstance(last[-1], nn.LayerNorm)
    assert last[-1] is m.vit.norm
    # (not bit for bit: the patches are embedded by a matrix product, timm's by a convolution)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", ["tiny", "vit-b16-imagenet"])
def test_patches_are_embedded_as_timms_patch_embed_does(preset):
    """embed_patches (one matrix product over each patch's pixels) computes timm's PatchEmbed
    convolution: tokens, and the gradient of the projection, for a batch of the preset's images."""
    cfg = load_config(preset, ["data.root=/nonexistent"], check_paths=False)
    torch.manual_seed(0)
    pe = build_encoder(cfg).vit.patch_embed
    x = torch.rand(4, 3, cfg.model.img_size, cfg.model.img_size)
    theirs = pe(x)
    pe.forward = lambda *a: pytest.fail("timm's convolution ran instead of the matrix product")
    ours = embed_patches(pe, x)
    assert ours.shape == theirs.shape == (4, cfg.model.grid ** 2, pe.proj.out_channels)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ours)
    gw_ours, = torch.autograd.grad(ours, pe.proj.weight, g)
    gw_theirs, = torch.autograd.grad(theirs, pe.proj.weight, g)
    torch.testing.assert_close(gw_ours, gw_theirs, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="built for"):
        embed_patches(pe, x[:, :, :-pe.patch_size[0]])


def test_other_patch_embeddings_keep_timms_forward():
    """A hybrid ViT's CNN stem is no single matrix product: embed_patches leaves it to timm."""
    import timm
    vit = timm.create_model("vit_tiny_r_s16_p8_224", pretrained=False, num_classes=0, img_size=64)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(embed_patches(vit.patch_embed, x), vit.patch_embed(x), rtol=0, atol=0)


def test_beit_finetuning_unties_the_shared_relative_position_bias(tmp_path):
    cfg = _beit("vit-s16-imagenet", **{"model.img_size": 64, "model.depth": 3})
    torch.manual_seed(0)
    pre = build_encoder(cfg)
    shared = pre.vit.rel_pos_bias.relative_position_bias_table
    with torch.no_grad():
        shared.copy_(torch.randn_like(shared))
    torch.save({"encoder": pre.state_dict()}, tmp_path / "ckpt.pt")  # written, read back as fine-tuning would
    state = torch.load(tmp_path / "ckpt.pt", map_location="cpu")["encoder"]
    ft = build_encoder(cfg, drop_path=0.1, for_finetune=True)
    ft.load_pretrained(state)
    assert ft.vit.rel_pos_bias is None
    tables = [blk.attn.relative_position_bias_table for blk in ft.vit.blocks]
    for t in tables:
        torch.testing.assert_close(t, shared, rtol=0, atol=0)
    assert len({t.data_ptr() for t in tables}) == len(tables)  # copies, each its own parameter
    # each table is decayed with its own block: scale decay^(L+1 - (i+1))
    net = Classifier(ft, 10)
    groups = param_groups(net, 0.05, cfg.finetune.layer_decay, ft)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    L = ft.depth
    for i, t in enumerate(tables):
        assert scale[id(t)] == pytest.approx(cfg.finetune.layer_decay ** (L + 1 - (i + 1)))
    # parameter count: the pre-training encoder without its final norm and shared table, plus one table per block
    n = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    D = pre.embed_dim
    assert n(ft) == n(pre) - 2 * D - shared.numel() + L * shared.numel()


def test_vit_finetuning_drops_the_final_norm_for_the_classifiers_own():
    cfg = load_config("tiny", [])
    pre, ft = build_encoder(cfg), build_encoder(cfg, for_finetune=True)
    assert isinstance(pre.vit.norm, nn.LayerNorm) and isinstance(ft.vit.norm, nn.Identity)
    ft.load_pretrained(pre.state_dict())  # the pre-trained norm is not expected by the classifier's encoder
    torch.testing.assert_close(ft.vit.blocks[0].attn.qkv.weight, pre.vit.blocks[0].attn.qkv.weight)


# ---------------------------------------------------------------------------------------------
# Checkpoints land on the CPU first, whatever the training device
# ---------------------------------------------------------------------------------------------
def test_resume_state_is_read_onto_the_cpu_whatever_the_device(small, tmp_path):
    cfg = small()
    pretrain(cfg, LocalSession(tmp_path, "pretrain"))
    # a session on another device (meta stands in for a GPU): the RNG state must stay a CPU byte
    # tensor (torch.set_rng_state refuses anything else); weights go to their device on load
    other = LocalSession(tmp_path, "pretrain", device="meta")
    state = resumable(cfg, other, "pretrain")
    assert state is not None

    def tensors(x):
        if isinstance(x, torch.Tensor):
            yield x
        elif isinstance(x, dict):
            for v in x.values():
                yield from tensors(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                yield from tensors(v)
    devices = {t.device.type for t in tensors(state)}
    assert devices == {"cpu"}
    torch.set_rng_state(state["rng"]["torch"])


# ---------------------------------------------------------------------------------------------
# The GPU check itself runs (here with gloo on the CPU, the same code path but the device)
# ---------------------------------------------------------------------------------------------
@pytest.mark.timeout(600)
@pytest.mark.slow
@pytest.mark.parametrize("variant", [[], ["--compile", "reduce-overhead", "--set", "pretrain.attention=flex"]],
                         ids=["eager", "cuda-graphs-flex"])
def test_gpu_check_script_passes_on_the_cpu(variant):
    """The GPU session's check, eager and in the configuration it checks there (CUDA graphs and
    FlexAttention, whose gradients it compares with SDPA's first; off a GPU both fall back, so this
    is the script and its arguments)."""
    small = ["--set", "model.img_size=32", "--set", "model.patch_size=8", "--set", "model.embed_dim=64",
             "--set", "model.depth=2", "--set", "model.num_heads=2", "--set", "model.projector_hidden=128",
             "--set", "model.projector_out=32", "--set", "masking.min_block_patches=2", "--set", "data.num_workers=0"]
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--batch", "16",
                        "--classes", "4", "--per-class", "16", *small, *variant], capture_output=True, text=True,
                       timeout=600)
    out = p.stdout
    assert p.returncode == 0, out + p.stderr[-3000:]
    for ph in ("pretrain", "probes", "finetune", *(["attention"] if variant else [])):
        assert f"PASS  {ph}" in out
    if variant:  # FlexAttention itself against SDPA (not SDPA against compiled SDPA)
        assert "FlexAttention forward on the cpu" in out, out
    assert "process group gloo (1 rank, collectives forced on)" in out and "final norm: LayerNorm" in out
    assert out.strip().endswith("RESULT PASS")


# ---------------------------------------------------------------------------------------------
# No read-back from the device per step: the loops wait for the GPU once per logging interval
# ---------------------------------------------------------------------------------------------
@contextmanager
def read_backs_counted(modules=("conmim.train.pretrain", "conmim.train.finetune")):
    """Counts the reads of a tensor's value into Python (.item, .tolist, float, int, bool) made by
    the training loops themselves: each is a wait for the device on a GPU."""
    calls = []
    names = ("item", "tolist", "__float__", "__int__", "__bool__")
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def counting(name):
        def read(self, *a, **kw):
            if sys._getframe(1).f_globals.get("__name__") in modules:
                calls.append(name)
            return saved[name](self, *a, **kw)
        return read
    try:
        for n in names:
            setattr(torch.Tensor, n, counting(n))
        yield calls
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


@pytest.mark.slow
def test_training_loops_read_the_device_once_per_interval_not_per_step(small, tmp_path):
    cfg = small(data__subset=512)  # 8 steps of pre-training and 8 of fine-tuning, one epoch each
    load_splits(cfg.data)
    with read_backs_counted() as calls:
        pre = pretrain(cfg, LocalSession(tmp_path, "pretrain"))
        finetune(cfg, LocalSession(tmp_path, "finetune"), pre["net"].encoder("momentum").state_dict())
    assert len(calls) <= 2, calls  # one read-back an epoch in each loop (8 per loop if it were per step)
    with read_backs_counted() as calls:
        pretrain(small(data__subset=512, pretrain__log_every=2), LocalSession(tmp_path / "b", "pretrain"))
    assert len(calls) == 4, calls  # every 2 steps, as configured
    acc = small(data__subset=512, pretrain__accumulate=2, finetune__accumulate=4)
    with read_backs_counted() as calls:  # micro-batches add no read-back either
        pre = pretrain(acc, LocalSession(tmp_path / "c", "pretrain"))
        finetune(acc, LocalSession(tmp_path / "c", "finetune"), pre["net"].encoder("momentum").state_dict())
    assert len(calls) <= 2, calls


@pytest.mark.timeout(600)
@pytest.mark.slow
def test_gpu_step_script_runs_on_the_cpu():
    """benchmarks/gpu_step.py (step alone vs the real loop on JPEGs) on a CPU with a 32² BEiT: the
    script itself, loader workers and reduced-size decoding included, does not rot; with two
    worker counts, two compile modes and FlexAttention for the compiled one (off a GPU its
    attention is SDPA's), as a GPU session runs it in one call."""
    small = ["--set", "model.img_size=32", "--set", "model.patch_size=8", "--set", "model.embed_dim=64",
             "--set", "model.depth=2", "--set", "model.num_heads=2", "--set", "model.projector_hidden=128",
             "--set", "model.projector_out=32", "--set", "masking.min_block_patches=2", "--set", "pretrain.amp=false"]
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_step.py"), "--device", "cpu", "--batch", "8",
                        "--steps", "4", "--workers", "1,0", "--compile", "false,reduce-overhead", "--pretrain-attention", "sdpa,flex",
                        *small],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    ratios = [l.split() for l in p.stdout.splitlines() if l.startswith("real / alone")]
    assert [r[-1] for r in ratios] == ["(data.num_workers=1)", "(data.num_workers=0)"] * 3, p.stdout
    final = p.stdout[p.stdout.rindex("| pretrain.compile"):]  # (the table at the end; each row also came as it was measured)
    table = [tuple(c.strip() for c in l.split("|")[1:4]) for l in final.splitlines() if l.startswith("| ") and "**" in l]
    assert table == [("False", "sdpa", "1"), ("False", "sdpa", "0"), ("reduce-overhead", "sdpa", "1"),
                     ("reduce-overhead", "sdpa", "0"), ("reduce-overhead", "flex", "1"), ("reduce-overhead", "flex", "0")], \
        p.stdout
    # each ratio is the real loop's images/s over the step alone's, as measured in its variant
    # (a ratio of a few steps is noise: its value is not checked, its arithmetic is)
    alone, loops = [], []
    for line in p.stdout.splitlines():
        if line.startswith("step alone "):
            alone.append(float(line.split()[2]))
        elif line.startswith("real loop "):
            loops.append((float(line.split()[2]), alone[-1]))
    assert len(loops) == len(ratios) == 6, p.stdout
    for (loop, step), r in zip(loops, ratios):
        rounding = loop / step * (0.05 / loop + 0.05 / step) + 0.0005  # (both printed to 0.1, the ratio to 0.001)
        assert abs(float(r[3]) - loop / step) <= rounding, (r, loop, step)
    assert "step alone" in p.stdout and "MFU" in p.stdout
    assert p.stdout.count("CUDA graphs       skipped") == 2  # (reported for the CUDA-graph mode only; off a GPU: skipped)


def test_gpu_session_script_runs_its_parts_in_order(tmp_path):
    """benchmarks/gpu_session.sh, the prepared device call, with python3, timeout and nvidia-smi
    replaced by shims that log their arguments: a mistake in it would cost a whole GPU draw. The
    first call runs its four parts in the order issue 14 needs them, within LIMIT (the call's
    timeout_s); 'autotune' runs one max-autotune variant, its attention from ATTENTION; anything
    else is refused."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    log = tmp_path / "log"
    for name, body in {"python3": 'echo "python3 $*" >> "$LOG"',
                       "timeout": 'echo "timeout $1" >> "$LOG"; shift; exec "$@"',
                       "nvidia-smi": "echo 'NVIDIA H200, 143771 MiB, 570'"}.items():
        (bin_ / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_ / name).chmod(0o755)

    def session(*args, **env):
        log.write_text("")
        p = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_session.sh"), *args], cwd=REPO,
                           capture_output=True, text=True, timeout=60,
                           env={"PATH": f"{bin_}:/usr/bin:/bin", "LOG": str(log), "OUT": str(tmp_path / "out"), **env})
        calls = [l for l in log.read_text().splitlines() if "-m pip" not in l]  # (.whl/ is there or not)
        return p, calls

    def limits(calls):
        return [int(c.split()[1]) for c in calls if c.startswith("timeout")]

    def within(got, want, slack=5):
        """Each part's limit is what is left of LIMIT - 30 when it starts (bash's SECONDS), capped:
        on a loaded machine a second or more may pass before a part starts."""
        return len(got) == len(want) and all(w - slack <= g <= w for g, w in zip(got, want))

    p, calls = session()
    assert p.returncode == 0, p.stderr
    runs = [c for c in calls if c.startswith("python3")]
    assert [c.split()[1] for c in runs] == ["benchmarks/gpu_step.py", "benchmarks/gpu_check.py",
                                           "benchmarks/gpu_step.py", "benchmarks/gpu_step.py"], calls
    assert "--compile reduce-overhead --pretrain-attention flex,sdpa" in runs[0]
    assert "--compile reduce-overhead --set pretrain.attention=flex" in runs[1]
    assert runs[2].endswith("--attention") and "--compile true" in runs[3]
    assert calls[0] == "timeout 330" and (tmp_path / "out" / "gpu.txt").read_text().startswith("NVIDIA H200")
    _, calls = session(LIMIT="130")  # a shorter first call, to leave device time for a second one
    got = limits(calls)  # (part 3 runs only while more than 90 s are left: the first 10 s of 100)
    assert within(got[:2], [100, 100]) and got[2:] == [60], calls
    _, calls = session(LIMIT="20")  # (never "timeout 0", which would be no limit at all)
    assert limits(calls) == [1, 1], calls

    p, calls = session("autotune", LIMIT="280")
    assert p.returncode == 0, p.stderr
    assert within(limits(calls), [250]) and len(calls) == 2, calls  # (LIMIT, the call's timeout_s, less 30 s for the copy back)
    assert "--compile max-autotune --pretrain-attention flex" in calls[1]
    _, calls = session("autotune", ATTENTION="sdpa")
    assert "--compile max-autotune --pretrain-attention sdpa" in calls[1]

    p, calls = session("autotuned")
    assert p.returncode == 2 and "unknown part 'autotuned'" in p.stderr and calls == []


@pytest.mark.timeout(600)
@pytest.mark.slow
def test_views_benchmark_runs_and_the_compiled_views_are_the_eager_ones():
    """benchmarks/views.py (eager against compiled views, what ``pretrain.compile`` compiles with the
    step) runs, and reports the compiled views within float rounding of the eager ones."""
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "views.py"), "--device", "cpu", "--batch", "4",
                        "--rounds", "1"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    diffs = [float(l.split("max |difference| ")[1].split(";")[0]) for l in p.stdout.splitlines() if "difference" in l]
    assert len(diffs) == 2 and max(diffs) < 1e-4, p.stdout


class HostCopies(TorchDispatchMode):
    """Records every copy of a host tensor onto the ``meta`` device, the accelerator's stand-in on a
    CPU: on a GPU such a copy (``t.to(x)``, ``torch.tensor(..., device=x.device)``) makes the host
    wait for every queued kernel, so the loop could no longer run ahead of the device.
    (``torch.tensor``/``torch.as_tensor`` with a device build on the host below the dispatcher's
    view, so they are watched by name.)"""

    def __init__(self):
        super().__init__()
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        ins = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        from_host = [t for t in ins if t.device.type == "cpu" and (t.dim() > 0 or func in _COPIES)]
        if from_host and any(t.device.type == "meta" for t in outs):
            self.copies.append(str(func))
        return out

    WATCHED = ((torch, "tensor"), (torch, "as_tensor"), (torch.Tensor, "new_tensor"))

    def _watch(self, owner, name):
        made = getattr(owner, name)

        def watched(*args, **kwargs):
            out = made(*args, **kwargs)
            data = args[1 if owner is torch.Tensor else 0]
            on_device = isinstance(data, torch.Tensor) and data.device == out.device
            if out.device.type == "meta" and not on_device:
                self.copies.append(f"{owner.__name__}.{name}")
            return out
        return watched

    def __enter__(self):
        self._made = [(owner, name, getattr(owner, name)) for owner, name in self.WATCHED]
        for owner, name, _ in self._made:
            setattr(owner, name, self._watch(owner, name))
        return super().__enter__()

    def __exit__(self, *exc):
        for owner, name, made in self._made:
            setattr(owner, name, made)
        return super().__exit__(*exc)


_COPIES = (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default)


@pytest.mark.parametrize("mode", ["asymmetric", "symmetric_strong"])
@pytest.mark.parametrize("geometry", [True, False])
def test_views_copy_nothing_from_the_host_after_the_first_batch(mode, geometry, monkeypatch):
    """The views made on the device from a batch already there (pixels and parameters copied by
    the loader): after the first batch, which copies the few constants once, not one tensor
    comes from the host, for the crop (fixed-size sources) and the strong view's every op."""
    from conmim.config.experiment import AugmentConfig
    from conmim.data import constants
    from conmim.data.transforms import TwoViewTransform
    monkeypatch.setattr(constants, "_ON_DEVICE", {})  # (as in a fresh process)
    tf = TwoViewTransform(AugmentConfig(blur_p=0.5), mode, 24, (0.5, 0.4, 0.3), (0.2, 0.2, 0.2), seed=1,
                          geometry=geometry)
    x = torch.randint(0, 256, (4, 3, 32, 32) if geometry else (4, 3, 24, 24), dtype=torch.uint8)
    params = tf.params(0, np.arange(4), x.shape[2], x.shape[3])
    on_meta = lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t  # noqa: E731  (the loader's copy)
    x, params = x.to("meta"), type(params)(*map(on_meta, params))
    first, later = HostCopies(), HostCopies()
    with first:
        tf.views(x, params)
    with later:
        masked, full = tf.views(x, params)
    assert masked.device.type == full.device.type == "meta" and masked.shape == (4, 3, 24, 24)
    assert first.copies, "the check sees nothing: the first batch copies the constants"
    assert later.copies == [], later.copies


@pytest.mark.parametrize("sync_bn", [False, True])
def test_the_pretraining_step_copies_nothing_from_the_host(sync_bn):
    """The step as pretrain() takes it (forward of both encoders and the loss under autocast,
    backward, clipping, AdamW, the momentum update) on tensors already on the device: from the
    second step on, nothing comes from the host (a one-rank group: the global batch norm's
    all-reduce runs too)."""
    from conmim.method.vit import param_groups
    from conmim.train.build import adamw, build_conmim
    cfg = load_config("tiny", ["data.root=/nonexistent", f"pretrain.sync_bn={str(sync_bn).lower()}"],
                      check_paths=False)
    torch.manual_seed(0)
    net = build_conmim(cfg).to("meta")
    opt = adamw(param_groups(net.online, 0.05), 1e-3, "meta")
    B, S, P = 4, cfg.model.img_size, cfg.model.grid ** 2
    xo, xt = torch.randn(B, 3, S, S, device="meta"), torch.randn(B, 3, S, S, device="meta")
    mask = torch.zeros(B, P, dtype=torch.bool, device="meta")

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):  # (autocast's casts, as on a GPU)
            loss_sum, spread = net(xo, xt, mask, mask)
        (loss_sum / (B * P)).backward()
        nn.utils.clip_grad_norm_(net.online.parameters(), 3.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        net.update_momentum(0.99)
        return torch.stack([loss_sum.detach().double(), spread.detach().double()])

    step()
    with HostCopies() as seen:
        totals = step()
    assert totals.device.type == "meta"
    assert seen.copies == [], seen.copies


def test_host_copies_sees_each_way_of_copying_to_the_device():
    """The check above catches what it is for: each way a host constant reaches the device."""
    x = torch.zeros(3, device="meta")
    for copy in (lambda: torch.tensor([1.0, 2.0, 3.0]).to(x), lambda: torch.tensor([1.0, 2.0], device=x.device),
                 lambda: torch.as_tensor(np.ones(3), device=x.device), lambda: x.new_tensor([3.0]),
                 lambda: torch.tensor(2.0).to(x.device)):
        with HostCopies() as seen:
            copy()
        assert seen.copies, copy
    with HostCopies() as seen:
        x * 2 + torch.as_tensor(x, device=x.device)  # (a scalar and a tensor already there: no copy)
    assert seen.copies == []


def test_randaugment_posterizes_to_black_at_its_top_magnitude():
    """The paper presets' RandAugment ("rand-m9-mstd0.5-inc1") keeps 0 bits when its noisy
    magnitude hits the cap of 10: a black image, as before Pillow 13, not Pillow 13's ValueError,
    which killed fine-tuning (seen once in gpu_check's CPU twin, ~2 % of posterize draws)."""
    from PIL import Image
    from conmim.train.finetune import _randaug
    ra = _randaug("rand-m9-mstd0.5-inc1", (0.5, 0.5, 0.5))
    op = next(o for o in ra.ops if o.name == "PosterizeIncreasing")
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0
    img = Image.fromarray(np.full((8, 8, 3), 200, np.uint8))
    assert np.asarray(op(img)).max() == 0
    op.magnitude = 5  # 2 bits kept: 200 = 0b11001000 -> 0b11000000
    assert np.asarray(op(img)).max() == 192


# ---------------------------------------------------------------------------------------------
# pretrain.compile: the step and the views compiled once, the eager step's losses
# ---------------------------------------------------------------------------------------------

@pytest.mark.timeout(600)
@pytest.mark.slow
def test_compiled_pretraining_compiles_the_step_and_the_views_once(small, tmp_path, monkeypatch):
    """``pretrain.compile`` is what a GPU run turns on for speed (+33 % on an H200), and what a
    data-dependent shape or a read-back in the step would quietly undo: a graph break splits the
    step, a recompile per batch costs seconds each. Here, on the CPU with Inductor (~50 s to
    compile): two epochs are two graphs (the step; the two views, compiled with it) with no break
    and no recompile, and the per-step losses are the eager step's (the first to float rounding;
    AdamW grows the round-off over 8 steps). Then the CUDA-graph mode, 'reduce-overhead': off a GPU
    Inductor skips the graphs, so the same kernels give the same losses, through the same loop
    (the mode passed to torch.compile, the iteration marked before each step)."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    cfg = dict(debug__log_steps=True, pretrain__epochs=2)  # data.subset 256: 4 steps an epoch
    eager = pretrain(small(**cfg), LocalSession(tmp_path / "eager", "pretrain"))
    try:
        compiled = pretrain(small(**cfg, pretrain__compile=True), LocalSession(tmp_path / "compiled", "pretrain"))
        assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"], \
            (dict(counters["stats"]), dict(counters["graph_break"]))
        a, b = eager["step_losses"], compiled["step_losses"]
        assert len(a) == len(b) == 8
        assert abs(a[0] - b[0]) < 1e-5 * abs(a[0])
        assert max(abs(x - y) for x, y in zip(a, b)) < 1e-2
        torch._dynamo.reset()  # (a new model: compiled afresh, not a recompile)
        graphs = pretrain(small(**cfg, pretrain__compile="reduce-overhead"), LocalSession(tmp_path / "graphs", "pretrain"))
        assert graphs["step_losses"] == pytest.approx(b, rel=1e-6)
    finally:
        torch._dynamo.reset()
