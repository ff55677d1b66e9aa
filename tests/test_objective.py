import math

import pytest
import torch

from conmim.method.objective import denoising_contrast_loss, target_spread
from conmim.train.build import build_conmim


def hand_loss(online, target, mask, tau, dictionary):
    """The loss written out with Python loops."""
    B, P, _ = online.shape
    total, n = 0.0, 0
    for b in range(B):
        for i in range(P):
            if not mask[b, i]:
                continue
            q = online[b, i] / online[b, i].norm()
            keys = [(bb, j) for bb in (range(B) if dictionary == "batch" else [b]) for j in range(P)]
            logits = [float(q @ (target[bb, j] / target[bb, j].norm())) / tau for bb, j in keys]
            pos = keys.index((b, i))
            m = max(logits)
            lse = m + math.log(sum(math.exp(l - m) for l in logits))
            total += lse - logits[pos]
            n += 1
    return total / n


@pytest.mark.parametrize("dictionary", ["image", "batch"])
def test_loss_equals_hand_computation(dictionary):
    g = torch.Generator().manual_seed(0)
    online, target = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    mask = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 1, 1], [1, 1, 1, 1, 0]], dtype=torch.bool)
    got = denoising_contrast_loss(online, target, mask, temperature=0.2, dictionary=dictionary)
    assert got.item() == pytest.approx(hand_loss(online, target, mask, 0.2, dictionary), rel=1e-5)


@pytest.mark.parametrize("dictionary", ["image", "batch"])
def test_fixed_rows_gather_the_same_loss(dictionary):
    """With the same number of masked patches in every image (as the masking guarantees), the
    fixed-shape gather gives the hand-computed loss too."""
    g = torch.Generator().manual_seed(1)
    online, target = torch.randn(3, 6, 4, generator=g), torch.randn(3, 6, 4, generator=g)
    mask = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 1, 0, 1, 1, 0], [1, 1, 0, 0, 0, 1]], dtype=torch.bool)
    got = denoising_contrast_loss(online, target, mask, temperature=0.2, dictionary=dictionary, rows=3)
    assert got.item() == pytest.approx(hand_loss(online, target, mask, 0.2, dictionary), rel=1e-5)
    free = denoising_contrast_loss(online, target, mask, 0.2, dictionary, reduction="sum")
    assert denoising_contrast_loss(online, target, mask, 0.2, dictionary, "sum", rows=3).item() == pytest.approx(free.item())
    s = denoising_contrast_loss(online, target, mask, 0.2, dictionary, reduction="sum")
    assert s.item() == pytest.approx(got.item() * mask.sum().item(), rel=1e-5)


def test_batch_dictionary_is_harder_than_image_dictionary():
    g = torch.Generator().manual_seed(1)
    online = torch.randn(4, 6, 8, generator=g)
    mask = torch.ones(4, 6, dtype=torch.bool)
    a = denoising_contrast_loss(online, online.clone(), mask, 0.1, "image")
    b = denoising_contrast_loss(online, online.clone(), mask, 0.1, "batch")
    assert b > a  # more negatives, same positives


def test_perfect_prediction_gives_low_loss_and_collapse_gives_log_p():
    P = 6
    target = torch.eye(P).unsqueeze(0) * 5
    mask = torch.ones(1, P, dtype=torch.bool)
    assert denoising_contrast_loss(target, target, mask, 0.05).item() < 1e-3
    collapsed = torch.ones(1, P, 4)
    assert denoising_contrast_loss(collapsed, collapsed, mask, 0.1).item() == pytest.approx(math.log(P), rel=1e-5)
    assert target_spread(collapsed).item() < 1e-6
    assert target_spread(torch.randn(2, 64, 16)).item() > 0.8


@pytest.mark.parametrize("target_encoder,stop_grad,expect_grad", [
    ("momentum", True, False), ("momentum", False, False), ("shared", True, False), ("shared", False, True)])
def test_gradient_reaches_key_branch_only_without_stop_grad_on_shared_encoder(small, target_encoder, stop_grad, expect_grad):
    cfg = small(objective__target_encoder=target_encoder, objective__stop_grad=stop_grad)
    torch.manual_seed(0)
    net = build_conmim(cfg)
    x = torch.randn(4, 3, 28, 28)
    full = x.clone().requires_grad_(True)
    masked = x.clone().requires_grad_(True)
    mask = torch.zeros(4, 16, dtype=torch.bool)
    mask[:, :6] = True
    loss, _ = net(masked, full, mask, mask)
    loss.backward()
    assert masked.grad is not None and masked.grad.abs().sum() > 0
    got = full.grad is not None and full.grad.abs().sum().item() > 0
    assert got == expect_grad
    if net.momentum is not None:
        assert all(p.grad is None for p in net.momentum.parameters())


def test_global_batchnorm_matches_batchnorm_in_one_process():
    from conmim.method.heads import GlobalBatchNorm1d
    torch.manual_seed(0)
    x = torch.randn(64, 8, requires_grad=True)
    a, b = torch.nn.BatchNorm1d(8), GlobalBatchNorm1d(8)
    ya, yb = a(x), b(x)
    assert torch.allclose(ya, yb, atol=1e-5)
    assert torch.allclose(a.running_var, b.running_var, atol=1e-6) and torch.allclose(a.running_mean, b.running_mean)
    ga, = torch.autograd.grad(ya.pow(3).sum(), x)
    gb, = torch.autograd.grad(yb.pow(3).sum(), x)
    assert torch.allclose(ga, gb, atol=1e-4)
