"""Tiny GliTr models for fast CPU tests."""

from __future__ import annotations

import torch

from glitr_cli.model import GliTr, build_glitr

TINY = dict(
    num_classes=4,
    num_frames=5,
    img_size=32,
    glimpse_size=2,
    embed_dim=16,
    depth=1,
    num_heads=2,
    patch_size=8,
    temporal_dim=32,
    temporal_depth=2,
    temporal_heads=2,
)


def tiny_glitr(seed: int = 0, **overrides) -> GliTr:
    torch.manual_seed(seed)
    model = build_glitr(**{**TINY, **overrides})
    # a visibly non-trivial location head, so locations move and gradients through them matter
    with torch.no_grad():
        model.locator.head.weight.normal_(0, 0.03)
        model.locator.init_loc.normal_(0, 0.2)
    return model


def clips(batch: int = 2, frames: int = 5, size: int = 32, seed: int = 0, smooth: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if not smooth:
        return torch.randn(batch, frames, 3, size, size, generator=g)
    # low-frequency frames: bilinear sampling of them is well conditioned in the location
    coarse = torch.randn(batch * frames, 3, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True)
    return x.view(batch, frames, 3, size, size)
