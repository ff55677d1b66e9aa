import pytest
import torch

from conmim.train import schedules
from conmim.method.heads import Projector
from conmim.method.momentum import MomentumEncoder


def test_momentum_encoder_starts_identical_and_follows_ema(monkeypatch):
    torch.manual_seed(0)
    online = Projector(8, 16, 4)
    ema = MomentumEncoder(online)
    for (n, p), (_, q) in zip(online.state_dict().items(), ema.net.state_dict().items()):
        assert torch.equal(p, q), n
    before = [p.clone() for p in ema.net.parameters()]
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    calls = []
    real = torch._foreach_lerp_
    monkeypatch.setattr(torch, "_foreach_lerp_", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    ema.update(online, 0.9)
    assert calls == [1]  # one fused call, not a loop over parameters
    for b, k, q in zip(before, ema.net.parameters(), online.parameters()):
        assert torch.allclose(k, 0.9 * b + 0.1 * q, atol=1e-6)
    # buffers (BatchNorm statistics) are the copy's own, never averaged
    online.net[1].running_mean.fill_(7.0)
    ema.update(online, 0.5)
    assert not torch.equal(ema.net.net[1].running_mean, online.net[1].running_mean)
    assert all(not p.requires_grad for p in ema.parameters())


def test_momentum_schedule_starts_at_m_and_ends_at_one():
    m = schedules.momentum(0.996, 1000)
    assert m[0] == pytest.approx(0.996)
    assert m[-1] == 1.0
    assert (m[1:] >= m[:-1]).all()


def test_lr_schedule_warms_up_then_decays_to_min():
    lr = schedules.cosine(1e-3, 1e-5, 100, 10)
    assert lr[0] == 0.0 and lr[10] == pytest.approx(1e-3) and lr[-1] == pytest.approx(1e-5)
    assert schedules.scaled_lr(5e-4, 4096, 2048) == pytest.approx(1e-3)
