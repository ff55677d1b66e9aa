"""Did pre-training solve its task by position? Two measurements on validation images after
pre-training, beside the collapse indicator (which pools over positions and images and so cannot
see a positional code):

* ``all_masked_loss``: the loss when *every* patch of the masked view is masked, so the online
  encoder sees nothing of the image, only positions. Picking a patch's own key among the P of its
  image is then chance (ln P) unless position alone identifies it. Near 0: the task is solved by
  position (an absolute position embedding shared by query and key allows that once the key
  branch gets a gradient).
* ``position_spread``: the spread, across images, of the normalised target feature at a fixed
  position (times sqrt(D), averaged over positions): about 1 when targets describe content, near
  0 when a position's target is the same in every image.

A trial is flagged (``positional_shortcut``) when ``all_masked_loss < 0.1 ln P``: position alone
solves the task. (At tiny scale the reference-style baseline with an absolute position embedding
reaches 0.4-0.6 ln P: it uses position a good deal, and the column says so; a differentiable key
branch reaches ~0.)"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from conmim.data.transforms import EvalTransform
from conmim.method.conmim import ConMIM
from conmim.method.objective import denoising_contrast_loss

SHORTCUT_FRACTION = 0.1  # all-masked loss below this fraction of ln P: the task is solved by position


@torch.no_grad()
def shortcut_diagnostics(net: ConMIM, images, img_size: int, device, n: int = 512, chunk: int = 128) -> dict:
    was_training = net.training
    net.eval()  # (the batch norms of the projectors use their running statistics: no batch effect)
    tf = EvalTransform(img_size, images.mean, images.std)
    target = net.momentum if net.momentum is not None else net.online
    idx = np.arange(min(n, len(images)))
    loss_sum, rows, keys = 0.0, 0, []
    for i in range(0, len(idx), chunk):
        x = tf(images.batch(idx[i: i + chunk], img_size)).to(device)
        k = target(x)  # [B, P, D]
        everything = torch.ones(k.shape[:2], dtype=torch.bool, device=device)
        q = net.online(x, everything)
        loss_sum += denoising_contrast_loss(q, k, everything, net.temperature, "image", reduction="sum").item()
        rows += everything.numel()
        keys.append(F.normalize(k.float(), dim=-1).cpu())
    net.train(was_training)
    k = torch.cat(keys)  # [N, P, D]
    spread = (k.std(0).mean(-1) * k.shape[-1] ** 0.5).mean().item()
    loss = loss_sum / rows
    return {"all_masked_loss": loss, "position_spread": spread,
            "positional_shortcut": bool(loss < SHORTCUT_FRACTION * math.log(k.shape[1]))}
