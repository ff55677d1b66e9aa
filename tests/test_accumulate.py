"""Gradient accumulation (``pretrain.accumulate`` / ``finetune.accumulate``): k micro-batches per
optimiser step are the k workers' slices of the same global batch. The projectors' BatchNorm is per
micro-batch, as the reference's per-GPU BatchNorm, so the exact equivalences pair runs whose
BatchNorm groups are the same: 1 worker x accumulate 2 = 2 workers, 2 workers x accumulate 2 =
1 worker x accumulate 4."""
import pytest
import torch
from click.testing import CliRunner
from torch.optim.optimizer import register_optimizer_step_pre_hook

from conmim.cli import main
from conmim.run.ray_train import pretrain_phase
from conmim.train.finetune import finetune
from conmim.train.pretrain import pretrain
from conmim.train.session import LocalSession

# float64: runs that differ only in reduction order agree to round-off (measured: 6e-14 and 4e-15
# over the 4 steps); 1e-9 leaves room for other BLAS summation orders, while another BatchNorm
# grouping changes the very first step's loss by ~1e-3 (checked below). Few steps on purpose: over
# many, AdamW's sign-like steps on round-off-sized gradients could grow it (tests/test_distributed.py)
TOL = 1e-9
PRETRAIN = dict(pretrain__batch_size=64, pretrain__lr_batch_size=64, pretrain__sync_bn=False, debug__float64=True,
                debug__log_steps=True, objective__dictionary="image")  # data.subset 256: 4 steps


def _max_diff(a, b):
    assert len(a) == len(b) > 0
    return max(abs(x - y) for x, y in zip(a, b))


def _same_run(a, b) -> float:
    """The largest difference of the per-step losses; the epoch's reported statistics agree to TOL."""
    for key in ("pretrain_loss", "target_std", "grad_norm", "lr", "momentum", "step"):
        x, y = a["history"][-1][key], b["history"][-1][key]
        assert abs(x - y) < TOL * max(1.0, abs(x)), (key, x, y)
    return _max_diff(a["step_losses"], b["step_losses"])


@pytest.mark.slow
@pytest.mark.timeout(600)  # 80 s in make test, 157 s when the VM ran at half speed
def test_micro_batches_equal_workers_step_by_step_in_float64(ray_session, small, tmp_path, capsys):
    def local(acc):
        return pretrain(small(**PRETRAIN, pretrain__accumulate=acc), LocalSession(tmp_path / f"l{acc}", "pretrain"))

    one_acc2, one_acc4 = local(2), local(4)
    two, _ = pretrain_phase(small(**PRETRAIN, resources__num_workers=2), tmp_path / "w2")
    two_acc2, _ = pretrain_phase(small(**PRETRAIN, resources__num_workers=2, pretrain__accumulate=2,
                                       debug__dump_replicas=True), tmp_path / "w2a2")
    assert len(one_acc2["step_losses"]) == 4 and one_acc2["step"] == two["step"] == two_acc2["step"] == 4
    d1 = _same_run(one_acc2, two)        # BatchNorm over 32 images in both
    d2 = _same_run(two_acc2, one_acc4)   # over 16 in both
    with capsys.disabled():
        print(f"\n[accumulate] max |loss diff| float64: 1w x acc2 vs 2w: {d1:.2e}; 2w x acc2 vs 1w x acc4: {d2:.2e}")
    assert d1 < TOL and d2 < TOL, (d1, d2, one_acc2["step_losses"], two["step_losses"])
    # the comparisons can fail: another BatchNorm grouping changes the very first step's loss
    assert abs(one_acc2["step_losses"][0] - one_acc4["step_losses"][0]) > 100 * TOL
    # the reported epoch loss is the mean of the steps' global-batch losses, however the batch is split
    assert one_acc4["history"][-1]["pretrain_loss"] == pytest.approx(sum(one_acc4["step_losses"]) / 4, abs=1e-12)
    # DDP's no_sync for all but the last micro-batch still leaves both replicas' weights (online and
    # momentum) identical; BatchNorm's running statistics are per worker (DDP broadcasts rank 0's
    # before each forward, which then updates each worker's own), as without accumulation
    r0 = torch.load(tmp_path / "w2a2" / "replicas" / "rank0.pt")
    r1 = torch.load(tmp_path / "w2a2" / "replicas" / "rank1.pt")
    weights = [k for k in r0 if not k.endswith(("running_mean", "running_var"))]
    assert r0.keys() == r1.keys() and any(k.startswith("momentum.") for k in weights)
    assert [k for k in weights if not torch.equal(r0[k], r1[k])] == []


@pytest.mark.slow
def test_finetuning_micro_batches_equal_the_whole_batch(small, tmp_path, capsys):
    """Fine-tuning has no BatchNorm: batch 64 in one piece and in two micro-batches of 32 are the
    same step, up to float32 round-off (mixup, cutmix, RandAugment, random erasing and drop path
    are off in `tiny`). The first step's gradient (same weights in both runs) is compared too: a
    wrong loss scale or a micro-batch left out shows there, whereas AdamW would hide a scale."""
    grads = {}

    def run(acc):
        grads[acc] = []

        def record(opt, args, kwargs):
            grads[acc].append(torch.cat([p.grad.flatten() for g in opt.param_groups for p in g["params"]
                                         if p.grad is not None]).double())
        handle = register_optimizer_step_pre_hook(record)
        try:
            cfg = small(finetune__accumulate=acc, debug__log_steps=True)
            assert (cfg.finetune.mixup, cfg.finetune.cutmix, cfg.finetune.randaug, cfg.finetune.random_erasing,
                    cfg.finetune.drop_path) == (0, 0, None, 0, 0)
            return finetune(cfg, LocalSession(tmp_path / f"a{acc}", "finetune"), None)
        finally:
            handle.remove()

    whole, parts = run(1), run(2)
    assert len(whole["finetune_step_losses"]) == len(grads[1]) == len(grads[2]) == 4
    # float32: one ulp of a loss ~2.3 is 2.4e-7; the other summation order moves it by about one
    # (measured 1.2e-7 over 4 steps: 4 AdamW steps at lr 1e-3 amplify it little); 1e-6 allows ~4 ulps
    # and is still 10 000x below what one step changes the loss by (~2e-2)
    d = _max_diff(whole["finetune_step_losses"], parts["finetune_step_losses"])
    assert d < 1e-6, (d, whole["finetune_step_losses"], parts["finetune_step_losses"])
    assert whole["finetune_history"][-1]["finetune_loss"] == pytest.approx(
        parts["finetune_history"][-1]["finetune_loss"], abs=1e-6)
    g1, g2 = grads[1][0], grads[2][0]
    rel = ((g1 - g2).abs().max() / g1.abs().max()).item()
    assert rel < 1e-6, rel  # float32 sums of 64 vs 2 x 32 terms: a few 1e-7 relative
    with capsys.disabled():
        print(f"\n[accumulate] fine-tuning float32: max |loss diff| {d:.2e}, first gradient max rel diff {rel:.2e}")


@pytest.mark.parametrize("sets,keys", [
    (["pretrain.accumulate=3"], ["pretrain.batch_size=64", "resources.num_workers=1", "pretrain.accumulate=3"]),
    (["resources.num_workers=2", "finetune.accumulate=3"],
     ["finetune.batch_size=128", "resources.num_workers=2", "finetune.accumulate=3"]),
    (["pretrain.accumulate=0"], ["pretrain.accumulate"]),
])
def test_indivisible_batch_exits_2_naming_the_keys(sets, keys):
    res = CliRunner().invoke(main, ["validate", "tiny", *[a for s in sets for a in ("--set", s)]])
    assert res.exit_code == 2, res.output
    assert res.output.startswith("conmim: error:") and "Traceback" not in res.output
    for k in keys:
        assert k in res.output, (k, res.output)


def test_validate_prints_the_per_gpu_batch(tmp_path):
    from PIL import Image
    # enough images for the preset's batch of 2048 (the data pre-flight refuses a smaller set)
    for c in ("a", "b"):
        (tmp_path / "train" / c).mkdir(parents=True)
        for i in range(1030):
            Image.new("RGB", (8, 8)).save(tmp_path / "train" / c / f"{i}.png")
    sets = ["data.root=" + str(tmp_path), "data.val_size=10"]
    runs = {
        (): "# per-worker batch: pretrain 64 (2048 / 32 workers / accumulate 1), "
            "finetune 32 (1024 / 32 workers / accumulate 1)",
        ("resources.num_workers=8", "pretrain.accumulate=4", "finetune.accumulate=4"):
            "# per-worker batch: pretrain 64 (2048 / 8 workers / accumulate 4), "
            "finetune 32 (1024 / 8 workers / accumulate 4)",
    }
    for extra, line in runs.items():
        args = [a for s in (*sets, *extra) for a in ("--set", s)]
        res = CliRunner().invoke(main, ["validate", "vit-b16-imagenet", *args])
        assert res.exit_code == 0, res.output
        assert res.output.splitlines()[-1] == line, res.output[-400:]
