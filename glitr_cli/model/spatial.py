"""T_f: the spatial encoder, a timm VisionTransformer that reads full frames or glimpses.

Full frames use the ViT's own patch position embeddings; a glimpse at location l gets those
embeddings resampled with the same affine map as its pixels, so each glimpse token carries
the position it was taken from. The output is the final-norm class token of each image.
"""

from __future__ import annotations

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer

from glitr_cli.errors import GlitrError
from glitr_cli.model.glimpse import extract_glimpse, extract_glimpse_separable, glimpse_theta


class SpatialEncoder(nn.Module):
    """A ViT with a class token whose forward takes frames and, for glimpses, locations.

    The submodules are those of the timm model (same parameter names: `cls_token`,
    `pos_embed` (1, 1 + n_h*n_w, D) with the class entry first, `patch_embed`, `blocks`,
    `norm`), so timm and iBOT state dicts load after dropping their heads.
    """

    def __init__(self, vit: VisionTransformer, glimpse_size: int) -> None:
        super().__init__()
        if vit.cls_token is None or vit.num_prefix_tokens != 1 or vit.no_embed_class:
            raise GlitrError(
                "the backbone must be a ViT with one class token and a position embedding for it "
                "(no register tokens, no_embed_class=False)"
            )
        self.patch_embed = vit.patch_embed
        self.cls_token = vit.cls_token
        self.pos_embed = vit.pos_embed
        self.pos_drop = vit.pos_drop
        self.norm_pre = vit.norm_pre
        self.blocks = vit.blocks
        self.norm = vit.norm
        self.embed_dim: int = vit.embed_dim
        self.patch_size: int = self.patch_embed.patch_size[0]
        self.grid_size: tuple[int, int] = tuple(self.patch_embed.grid_size)  # (n_h, n_w)
        self.glimpse_size = glimpse_size
        self.grad_checkpointing = False
        self.separable_sampling = False  # `set_separable_sampling`

    @property
    def glimpse_scale(self) -> tuple[float, float]:
        """(s_x, s_y): the fraction of each frame axis that one glimpse spans."""
        return self.glimpse_size / self.grid_size[1], self.glimpse_size / self.grid_size[0]

    @property
    def glimpse_pixels(self) -> int:
        return self.glimpse_size * self.patch_size

    def no_weight_decay(self) -> set[str]:
        """Parameters that an optimiser excluding embeddings from weight decay leaves undecayed (timm's API)."""
        return {"cls_token", "pos_embed"}

    def set_fused_attn(self, enabled: bool) -> None:
        for block in self.blocks:
            block.attn.fused_attn = enabled

    def set_separable_sampling(self, enabled: bool) -> None:
        """Sample glimpses and their position embeddings with `extract_glimpse_separable` (two matrix products)
        instead of `grid_sample`: the same numbers up to float rounding, for an exported graph (`glitr export`),
        where a general sampler is slow."""
        self.separable_sampling = enabled

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of keeping them (only where the weights
        get gradients)."""
        self.grad_checkpointing = enable

    def _patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(images)  # (N, D, h, w)
        x = x.flatten(2).transpose(1, 2)  # (N, h*w, D), row-major
        return self.patch_embed.norm(x)

    def _encode(self, tokens: torch.Tensor) -> torch.Tensor:
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)  # (N, 1, D)
        x = torch.cat([cls, tokens], dim=1)
        x = self.norm_pre(self.pos_drop(x))
        # Only where the weights train: the teacher's frozen glimpse pass runs on detached weights swapped in by
        # functional_call, which a recompute in backward would no longer see.
        if self.grad_checkpointing and torch.is_grad_enabled() and self.cls_token.requires_grad:
            x = checkpoint_seq(self.blocks, x, use_reentrant=False)
        else:
            x = self.blocks(x)
        return self.norm(x)[:, 0]  # (N, D)

    def forward(self, images: torch.Tensor, loc: torch.Tensor | None = None) -> torch.Tensor:
        """Encode full frames (`loc` None) or glimpses at `loc` (N, 2) of `images` (N, 3, H, W) -> (N, D)."""
        if loc is None:
            return self._encode(self._patch_tokens(images) + self.pos_embed[:, 1:])
        side = self.glimpse_pixels
        extract = extract_glimpse_separable if self.separable_sampling else extract_glimpse
        return self.encode_glimpses(extract(images, loc, (side, side), self.glimpse_scale), loc)

    def encode_glimpses(self, glimpses: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
        """Encode glimpses (N, 3, g*p, g*p) already cut at `loc` (N, 2) -> (N, D)."""
        return self._encode(self._patch_tokens(glimpses) + self.glimpse_pos_embed(loc))

    def glimpse_pos_embed(self, loc: torch.Tensor) -> torch.Tensor:
        """Patch position embeddings resampled at the glimpse grid of `loc` (N, 2) -> (N, g*g, D)."""
        n_h, n_w = self.grid_size
        g = self.glimpse_size
        table = self.pos_embed[:, 1:].reshape(1, n_h, n_w, -1).permute(0, 3, 1, 2)  # (1, D, n_h, n_w)
        if self.separable_sampling:
            pos = extract_glimpse_separable(table, loc, (g, g), self.glimpse_scale)  # (N, D, g, g)
            return pos.flatten(2).transpose(1, 2)  # (N, g*g, D)
        table = table.expand(loc.shape[0], -1, -1, -1)
        theta = glimpse_theta(loc.to(table.dtype), self.glimpse_scale)
        grid = F.affine_grid(theta, [loc.shape[0], table.shape[1], g, g], align_corners=True)
        pos = F.grid_sample(table, grid, mode="bilinear", padding_mode="zeros", align_corners=True)  # (N, D, g, g)
        return pos.flatten(2).transpose(1, 2)  # (N, g*g, D)


class ConvStem(nn.Sequential):
    """`conv_stem`'s layers, run on channels-last images: the same numbers as the plain
    `nn.Sequential` (to float rounding), and on a CPU the convolutions and their backward take about
    two thirds of the time they take on the default layout. The output (N, D, h, w) is channels-last
    too, so the (N, h*w, D) tokens that `SpatialEncoder` reads from it need no copy."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return super().forward(images.contiguous(memory_format=torch.channels_last))


def conv_stem(embed_dim: int, patch_size: int) -> ConvStem:
    """A convolutional patch embedding: 3x3 stride-2 convs + GELU down to the patch grid, then 1x1 to D.

    "Early convolutions help transformers see better" (Xiao et al., NeurIPS 2021): a ViT with
    this stem instead of one linear projection per patch trains far faster from random weights,
    which is what a small dataset without pretrained weights needs. It maps (N, 3, H, W) to
    (N, D, H/p, W/p) like the projection it replaces, so glimpses (g*p pixels -> g x g tokens) work
    unchanged. No normalisation layers: full frames
    and glimpses go through the same weights. `patch_size` must be a power of two.
    """
    n = patch_size.bit_length() - 1
    if patch_size < 2 or 2**n != patch_size:
        raise GlitrError(f"model.stem=conv needs a power-of-two patch size, got {patch_size}")
    widths = [3] + [min(embed_dim, 16 * 2**i) for i in range(n)]
    layers: list[nn.Module] = []
    for c_in, c_out in zip(widths, widths[1:], strict=False):
        layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GELU()]
    layers.append(nn.Conv2d(widths[-1], embed_dim, 1))
    for layer in layers:  # variance-preserving init, else the image signal fades through the stack
        if isinstance(layer, nn.Conv2d):
            last = layer is layers[-1]
            nn.init.kaiming_normal_(layer.weight, nonlinearity="linear" if last else "relu")
            nn.init.zeros_(layer.bias)
    return ConvStem(*layers)


def create_spatial_encoder(
    backbone: str,
    *,
    img_size: int,
    glimpse_size: int,
    drop_path: float = 0.0,
    fused_attn: bool = True,
    **overrides: int,
) -> SpatialEncoder:
    """Build T_f from a timm ViT name (`vit_small_patch16_224` is DeiT-S geometry), random weights.

    `overrides` (embed_dim, depth, num_heads, patch_size) change the geometry, e.g. for tiny
    test models; None values keep the named model's own.
    """
    kwargs = {k: v for k, v in overrides.items() if v is not None}
    try:
        vit = timm.create_model(
            backbone, pretrained=False, num_classes=0, img_size=img_size, drop_path_rate=drop_path, **kwargs
        )
    except RuntimeError as e:  # timm's "Unknown model"
        raise GlitrError(f"backbone {backbone!r}: {e}") from None
    if not isinstance(vit, VisionTransformer):
        raise GlitrError(f"backbone {backbone!r} is a {type(vit).__name__}, expected a timm VisionTransformer")
    grid = vit.patch_embed.grid_size
    if glimpse_size > min(grid):
        raise GlitrError(f"glimpse_size {glimpse_size} is larger than the {grid[0]}x{grid[1]} patch grid")
    encoder = SpatialEncoder(vit, glimpse_size)
    encoder.set_fused_attn(fused_attn)
    return encoder
