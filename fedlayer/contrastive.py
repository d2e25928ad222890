"""SimCLR-style self-supervision: two augmented views and the NT-Xent loss.

Augmentations are tensor ops on the (N, C, H, W) batch so they run on any
device without PIL: a random crop after reflection padding (a random shift
of up to ``pad`` pixels) and a random horizontal flip, drawn per image from
a seeded generator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def random_crop_flip(x: Tensor, generator: torch.Generator, pad: int = 4) -> Tensor:
    """Each image shifted by up to ``pad`` pixels (reflect padding) and flipped with p=1/2."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).tolist()
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).tolist()
    flips = (torch.rand(n, generator=generator) < 0.5).tolist()
    views = []
    for i in range(n):
        view = padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
        views.append(view.flip(-1) if flips[i] else view)
    return torch.stack(views)


def augment_pair(x: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Two independently augmented views of a batch."""
    return random_crop_flip(x, generator), random_crop_flip(x, generator)


def nt_xent(z: Tensor, temperature: float = 0.5) -> Tensor:
    """NT-Xent (Chen et al. 2020) on ``z = cat([view1, view2])``: row ``i``'s
    positive is row ``i + N`` (and back); the other ``2N - 2`` rows are negatives."""
    if z.shape[0] % 2:
        raise ValueError("nt_xent needs an even number of rows (two views per example)")
    n = z.shape[0] // 2
    z = F.normalize(z, dim=1)
    sim = z @ z.t() / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, targets)
