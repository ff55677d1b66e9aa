import numpy as np
import pytest
import torch

from conmim.config.experiment import AugmentConfig
from conmim.data.sources import load_splits
from conmim.data.transforms import TwoViewTransform


@pytest.fixture(scope="module")
def images(request):
    from conftest import small_cfg
    train = load_splits(small_cfg().data)["train"]
    idx = np.arange(64)
    return train, idx, train.batch(idx, 28)


def views(train, x, idx, mode, augment=None, epoch=0):
    tf = TwoViewTransform(augment or AugmentConfig(), mode, 28, train.mean, train.std, seed=3)
    return tf, tf(x, epoch, idx)


def test_views_share_the_crop_when_photometric_ops_are_off(images):
    train, idx, x = images
    no_colour = AugmentConfig(jitter_p=0, grayscale_p=0, blur_p=0, solarize_p=0)
    for mode in ("asymmetric", "symmetric_strong", "switched"):
        _, (a, b) = views(train, x, idx, mode, no_colour)
        assert torch.equal(a, b), mode
    # ...and the crop really is random: not the identity, different across epochs
    tf, (a, _) = views(train, x, idx, "asymmetric", no_colour)
    plain = tf.normalize(x.float() / 255)
    assert not torch.allclose(a, plain)
    _, (a2, _) = views(train, x, idx, "asymmetric", no_colour, epoch=1)
    assert not torch.allclose(a, a2)


@pytest.mark.parametrize("mode,perturbed", [
    ("asymmetric", (False, True)), ("symmetric_basic", (False, False)),
    ("symmetric_strong", (True, True)), ("switched", (True, False))])
def test_only_the_strong_view_is_colour_perturbed(images, mode, perturbed):
    train, idx, x = images
    tf, (masked_view, full_view) = views(train, x, idx, mode)
    geometry_only = tf.normalize(tf.shared_geometry(x, 0, idx))
    for view, strong in zip((masked_view, full_view), perturbed):
        changed = (view - geometry_only).abs().flatten(1).amax(1) > 1e-4
        if strong:
            # p(no op at all) = 0.2 * 0.8 * 0.9 * 0.8 ~ 0.12: most images change, not all
            assert 0.6 < changed.float().mean() < 1.0
        else:
            assert not changed.any()
    if mode == "symmetric_strong":
        assert not torch.allclose(masked_view, full_view)  # independent strong draws


def test_views_depend_only_on_seed_epoch_and_index(images):
    train, idx, x = images
    tf = TwoViewTransform(AugmentConfig(), "asymmetric", 28, train.mean, train.std, seed=3)
    a, b = tf(x, 2, idx)
    a1, b1 = tf(x[:10], 2, idx[:10])
    a2, b2 = tf(x[10:], 2, idx[10:])
    assert torch.allclose(a, torch.cat([a1, a2]), atol=1e-6)
    assert torch.allclose(b, torch.cat([b1, b2]), atol=1e-5)
