import numpy as np
import pytest
import torch

from conmim.config.experiment import AugmentConfig
from conmim.data.sources import load_splits
from conmim.data.geometry import resized_crop
from conmim.data.photometric import StrongPerturbation, _adjust_hue, _blend, _gaussian_blur, _gray
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
    p = tf.params(0, idx, 28, 28)
    geometry_only = tf.normalize(resized_crop(x.float() / 255, p.boxes, p.flip, 28))
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



def subset_perturbation(sp: StrongPerturbation, x, t):
    """The strong view as it was computed before the device path: each op on the selected images
    only (index_copy of a subset, data-dependent shapes). The reference for the batched version."""
    jit = t[:, 0] < sp.jitter_p
    if jit.any():
        idx = jit.nonzero().squeeze(1)
        y, tj = x[idx], t[idx]
        f = lambda col, s: 1 - s + 2 * s * tj[:, col]  # noqa: E731
        y = _blend(y, torch.zeros_like(y), f(1, sp.brightness))
        y = _blend(y, _gray(y).mean((1, 2, 3), keepdim=True).expand_as(y), f(2, sp.contrast))
        y = _blend(y, _gray(y).expand_as(y), f(3, sp.saturation))
        y = _adjust_hue(y, (2 * tj[:, 4] - 1) * sp.hue)
        x = x.index_copy(0, idx, y)
    gray = t[:, 5] < sp.grayscale_p
    x = torch.where(gray.view(-1, 1, 1, 1), _gray(x).expand_as(x), x)
    blur = t[:, 6] < sp.blur_p
    if blur.any():
        idx = blur.nonzero().squeeze(1)
        lo, hi = sp.blur_sigma
        x = x.index_copy(0, idx, _gaussian_blur(x[idx], lo + (hi - lo) * t[idx, 7], hi))
    sol = t[:, 8] < sp.solarize_p
    return torch.where(sol.view(-1, 1, 1, 1) & (x >= 0.5), 1 - x, x)


@pytest.mark.parametrize("mode", ["asymmetric", "symmetric_strong", "switched"])
def test_device_path_views_equal_the_cpu_path(images, mode):
    """The loader draws the parameters and ships uint8 pixels; the views are made after the
    copy to the device. They equal the views made image by image on the CPU, with each strong op
    applied only to the images that draw it (the CPU path this replaced), to float tolerance."""
    from conmim.data import rng as crng
    from conmim.data.sampler import EpochsOfBatches, batches
    train, idx, x = images
    tf = TwoViewTransform(AugmentConfig(blur_p=0.5), mode, 28, train.mean, train.std, seed=3)
    loader = batches(lambda ep, index: (train.batch(index, 28), tf.params(ep, index, 28, 28)),
                     EpochsOfBatches(len(idx), 32, 0, 1, 3, 4, 5), num_workers=1)
    for (imgs, p), index in zip(loader, EpochsOfBatches(len(idx), 32, 0, 1, 3, 4, 5)):
        masked, full = tf.views(imgs, p)  # "on the device"
        index = index[1]
        for i, j in enumerate(index):  # the CPU path, one image at a time
            one = train.batch(np.array([j]), 28).float() / 255
            u = crng.uniforms(3, 4, np.array([j]), crng.GEOMETRY, 23)
            from conmim.data.geometry import flip_and_boxes
            b, f = flip_and_boxes(u, 28, 28, tf.a.crop_scale, tf.a.crop_ratio, tf.a.flip_p)
            one = resized_crop(one, torch.from_numpy(b).float(), torch.from_numpy(f), 28)
            draws = {"strong": crng.uniforms(3, 4, np.array([j]), crng.STRONG_VIEW, 10),
                     "strong2": crng.uniforms(3, 4, np.array([j]), crng.STRONG_VIEW_2, 10)}
            kinds = tf.kinds
            us = (draws["strong"], draws["strong2"] if kinds == ("strong", "strong") else draws["strong"])
            for got, kind, uu in zip((masked[i], full[i]), kinds, us):
                ref = subset_perturbation(tf.strong, one, torch.as_tensor(uu).float()) if kind == "strong" else one
                torch.testing.assert_close(got, tf.normalize(ref)[0], rtol=0, atol=1e-5)


def test_hue_shift_equals_torchvisions():
    from torchvision.transforms.functional import adjust_hue
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 9, 9, generator=g)
    x[0] = 0.5  # grey: no hue at all
    x[1, :, :3] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)  # pure primaries at the case boundaries
    shifts = torch.tensor([0.1, -0.5, 0.25, 0.0, 0.49, -0.33])
    ours = _adjust_hue(x, shifts)
    for i in range(6):
        torch.testing.assert_close(ours[i], adjust_hue(x[i], float(shifts[i])), rtol=0, atol=2e-6)


def test_blur_equals_a_reflect_padded_separable_convolution():
    """The blur as matrix products equals the grouped convolution of each image with its own
    Gaussian on reflect-padded pixels, square and not."""
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(0)
    for H, W in ((28, 28), (17, 23)):
        x = torch.rand(5, 3, H, W, generator=g, dtype=torch.float64)
        sigma = torch.tensor([0.1, 0.5, 1.0, 1.7, 2.0], dtype=torch.float64)
        radius = min(6, (min(H, W) - 1) // 2)
        t = torch.arange(-radius, radius + 1, dtype=torch.float64)
        k = torch.exp(-0.5 * (t.view(1, -1) / sigma.view(-1, 1)) ** 2)
        k = (k / k.sum(1, keepdim=True)).repeat_interleave(3, 0)
        y = F.pad(x.reshape(1, 15, H, W), (radius,) * 4, mode="reflect")
        y = F.conv2d(F.conv2d(y, k.view(15, 1, 1, -1), groups=15), k.view(15, 1, -1, 1), groups=15)
        torch.testing.assert_close(_gaussian_blur(x, sigma, 2.0), y.view(5, 3, H, W), rtol=0, atol=1e-12)


def grid_sample_crop(x, boxes, flip, size):
    """The crop as an affine grid sampled bicubically with border padding (the implementation
    before the matrix form)."""
    import torch.nn.functional as F
    B, _, H, W = x.shape
    top, left, h, w = boxes.to(x.dtype).unbind(1)
    theta = torch.zeros(B, 2, 3, dtype=x.dtype)
    theta[:, 0, 0] = w / W * (1.0 - 2.0 * flip.to(x.dtype))
    theta[:, 0, 2] = (left + w / 2) / W * 2 - 1
    theta[:, 1, 1] = h / H
    theta[:, 1, 2] = (top + h / 2) / H * 2 - 1
    grid = F.affine_grid(theta, [B, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bicubic", padding_mode="border", align_corners=False).clamp_(0, 1)


@pytest.mark.parametrize("H,W,size", [(28, 28, 28), (32, 40, 24), (20, 20, 56)])
def test_resized_crop_equals_grid_sample(H, W, size):
    """Down- and upscaling, flipped and not, crops touching the border: the matrix form computes
    grid_sample's bicubic values to float rounding."""
    from conmim.data import rng as crng
    from conmim.data.geometry import GEOMETRY_UNIFORMS, flip_and_boxes
    x = torch.rand(64, 3, H, W, generator=torch.Generator().manual_seed(1))
    b, f = flip_and_boxes(crng.uniforms(0, 0, np.arange(64), 0, GEOMETRY_UNIFORMS), H, W, (0.08, 1), (3 / 4, 4 / 3), 0.5)
    b, f = torch.from_numpy(b).float(), torch.from_numpy(f)
    assert 0 < f.sum() < 64 and ((b[:, 0] == 0) | (b[:, 1] == 0)).any()
    torch.testing.assert_close(resized_crop(x, b, f, size), grid_sample_crop(x, b, f, size), rtol=0, atol=2e-5)


@pytest.mark.parametrize("mode", ["asymmetric", "symmetric_basic", "symmetric_strong", "switched"])
def test_a_grayscale_batch_is_computed_on_its_one_channel(images, mode):
    """Fashion-MNIST's batches are one channel broadcast to three: the views, the fine-tuning and
    the evaluation transforms compute on that one channel and equal, bit for bit, what they make of
    the same batch with its three channels written out (every op is per channel or a luma sum of
    equal channels; the hue shift of a grey image is the identity)."""
    from conmim.data.transforms import EvalTransform, FinetuneTransform, to_unit
    train, idx, x = images
    assert x.stride(1) == 0 and to_unit(x).shape[1] == 1  # (else this test compares a path with itself)
    written_out = x.contiguous()
    assert to_unit(written_out).shape[1] == 3
    every_op = AugmentConfig(jitter_p=1.0, grayscale_p=0.5, blur_p=0.5, solarize_p=0.5)
    for augment in (AugmentConfig(), every_op):
        tf = TwoViewTransform(augment, mode, 28, train.mean, train.std, seed=3)
        for epoch in range(3):
            for got, want in zip(tf(x, epoch, idx), tf(written_out, epoch, idx)):
                assert got.shape == want.shape == (64, 3, 28, 28) and got.is_contiguous()
                assert torch.equal(got, want)
    ft = FinetuneTransform(28, train.mean, train.std, seed=3, scale=(0.35, 1.0))
    assert torch.equal(ft(x, 1, idx), ft(written_out, 1, idx))
    for size in (28, 32):
        ev = EvalTransform(size, train.mean, train.std)
        assert torch.equal(ev(x), ev(written_out))
