"""VideoMAE ViT video classifier, the model GliTr's SSv2 teacher is distilled from.

VideoMAE: Masked Autoencoders are Data-Efficient Learners for Self-Supervised Video Pre-Training
(Tong, Song, Wang, Wang; NeurIPS 2022). This is the *fine-tuning* classifier: a 3D tubelet patch embedding, a fixed
sinusoidal positional table, pre-norm ViT blocks whose attention has q/v biases but no k bias, mean pooling over all
tokens, ``fc_norm`` and a linear head. Parameter names follow the released checkpoints, so a fine-tuned state dict
loads as is (see ``load_videomae``); ``tests/fixtures/reference-videomae`` proves the outputs equal the original's.

Layouts: the model takes (B, C, T, H, W) like the original; glitr clips are (B, T, C, H, W), use ``forward_clip``.

As a teacher the model is frozen: call ``model.freeze()`` (eval mode, no gradients) after loading.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from timm.models import checkpoint_seq, named_apply
from timm.models.beit import Block
from timm.models.vision_transformer import init_weights_vit_timm
from torch import nn

from glitr_cli.errors import GlitrError
from glitr_cli.model.weights import key_summary, load_state_dict_checked, read_checkpoint

__all__ = ["VideoMAE", "build_videomae", "checkpoint_filter_fn", "load_videomae", "sinusoid_table"]

# Prefixes the original fine-tuning script strips before loading (pre-training checkpoints store the encoder
# under ``encoder.``).
_STRIP_PREFIXES = ("backbone.", "encoder.")
# Where the weights sit in a released checkpoint: ``model`` (plain training path) then ``module`` (DeepSpeed), the
# order of the original ``--model_key model|module``; anything else is taken to be a bare state dict.
_STATE_DICT_KEYS = ("model", "module")


# ----------------------------------------------------------------------------------------------------------- blocks


def sinusoid_table(num_positions: int, dim: int) -> torch.Tensor:
    """Fixed positional table, (num_positions, dim) float32.

    ``PE[p, 2i] = sin(p / 10000^(2i/dim))`` and ``PE[p, 2i+1] = cos(...)``, computed in float64 and rounded to float32
    once, bit for bit as the original builds it with numpy.
    """
    pos = torch.arange(num_positions, dtype=torch.float64)[:, None]  # (P, 1)
    expo = (2 * (torch.arange(dim) // 2)).to(torch.float64) / dim  # (D,)
    angle = pos / torch.pow(10000.0, expo)  # (P, D)
    table = torch.empty_like(angle)
    table[:, 0::2] = torch.sin(angle[:, 0::2])
    table[:, 1::2] = torch.cos(angle[:, 1::2])
    return table.to(torch.float32)


class TubeletEmbed(nn.Module):
    """Non-overlapping (tubelet, patch, patch) cubes to tokens: (B, C, T, H, W) -> (B, T' * H' * W', D)."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        num_frames: int = 16,
        tubelet_size: int = 2,
        in_chans: int = 3,
        embed_dim: int = 768,
    ) -> None:
        super().__init__()
        if img_size % patch_size or num_frames % tubelet_size:
            raise GlitrError(
                f"VideoMAE: img_size {img_size} must be a multiple of patch_size {patch_size} and num_frames "
                f"{num_frames} a multiple of tubelet_size {tubelet_size}"
            )
        self.img_size = img_size
        self.num_frames = num_frames
        self.in_chans = in_chans
        self.grid_size = (num_frames // tubelet_size, img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1] * self.grid_size[2]
        kernel = (tubelet_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=kernel, stride=kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expected = (self.in_chans, self.num_frames, self.img_size, self.img_size)
        if x.ndim != 5 or tuple(x.shape[1:]) != expected:
            raise GlitrError(
                f"VideoMAE expects (B, C, T, H, W) with (C, T, H, W) = {expected}, got {tuple(x.shape)}"
                " (for (B, T, C, H, W) clips use forward_clip)"
            )
        x = self.proj(x)  # (B, D, T', H', W')
        return x.flatten(2).transpose(1, 2)  # (B, T'*H'*W', D), tokens in (t', h', w') row-major order


# ----------------------------------------------------------------------------------------------------------- model


class VideoMAE(nn.Module):
    """VideoMAE fine-tuning classifier (mean pooling, ``fc_norm``, linear head; no class token).

    Input (B, C, T, H, W) with T = ``num_frames`` and H = W = ``img_size``; output (B, ``num_classes``) logits.
    Dropout and drop-path are not implemented (the teacher is only ever evaluated).
    """

    def __init__(
        self,
        num_classes: int = 174,
        num_frames: int = 16,
        img_size: int = 224,
        patch_size: int = 16,
        tubelet_size: int = 2,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        fused_attn: bool = True,
        head_init_scale: float = 0.001,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise GlitrError(f"VideoMAE: embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.patch_embed = TubeletEmbed(img_size, patch_size, num_frames, tubelet_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        # Fixed, not learned, and not in the state dict; a buffer so that .to()/.double() move and cast it.
        self.register_buffer("pos_embed", sinusoid_table(num_patches, embed_dim)[None], persistent=False)  # (1, N, D)
        # timm's BEiT block is VideoMAE's: pre-norm, q and v biases with a constant zero k bias, exact GELU, no
        # layer scale (init_values None), LayerNorm eps 1e-6, the same parameter names.
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, qkv_bias=True, mlp_ratio=mlp_ratio) for _ in range(depth)]
        )
        self.grad_checkpointing = False
        self.norm = nn.Identity()  # the original's final norm is an Identity when mean pooling is on
        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights(head_init_scale)
        self.set_fused_attn(fused_attn)

    # -- init -----------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self, head_init_scale: float = 0.001) -> None:
        """Fine-tuning init of the original: trunc-normal(0.02) linears, zero biases, unit LayerNorms, small head."""
        named_apply(init_weights_vit_timm, self)
        if isinstance(self.head, nn.Linear):
            self.head.weight.mul_(head_init_scale)
            self.head.bias.mul_(head_init_scale)

    @torch.no_grad()
    def init_non_persistent_buffers(self) -> None:
        """Refill the buffers a state dict does not hold, the positional table and the blocks' zero k biases (after
        ``to_empty``, e.g. when the model was built on the meta device)."""
        table = sinusoid_table(self.pos_embed.shape[1], self.embed_dim)[None]  # (1, N, D)
        self.pos_embed.copy_(table.to(self.pos_embed.device))
        for blk in self.blocks:
            blk.attn.init_non_persistent_buffers()

    def set_fused_attn(self, enable: bool) -> None:
        """Switch every block between fused scaled-dot-product attention and the explicit softmax path."""
        for blk in self.blocks:
            blk.attn.fused_attn = enable

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of keeping them (only when training)."""
        self.grad_checkpointing = enable

    def freeze(self) -> VideoMAE:
        """Teacher mode: eval (no dropout anywhere anyway) and ``requires_grad=False`` on every parameter."""
        self.eval()
        self.requires_grad_(False)
        return self

    # -- forward --------------------------------------------------------------------------------------------------

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) -> tokens (B, N, D), N = (T / tubelet) * (H / patch) * (W / patch)."""
        x = self.patch_embed(x)  # (B, N, D)
        x = x + self.pos_embed.to(dtype=x.dtype)  # (1, N, D) broadcast
        if self.grad_checkpointing and torch.is_grad_enabled() and self.patch_embed.proj.weight.requires_grad:
            x = checkpoint_seq(self.blocks, x, use_reentrant=False)
        else:
            for blk in self.blocks:
                x = blk(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens (B, N, D) -> logits (B, num_classes), or the pooled features (B, D) when ``pre_logits``."""
        x = self.fc_norm(x.mean(dim=1))  # (B, D)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) -> logits (B, num_classes)."""
        return self.forward_head(self.forward_features(x))

    def forward_clip(self, x_btchw: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """glitr clip layout (B, T, C, H, W) -> logits (B, num_classes) (or pooled features with ``pre_logits``)."""
        if x_btchw.ndim != 5:
            raise GlitrError(f"VideoMAE.forward_clip expects (B, T, C, H, W), got {tuple(x_btchw.shape)}")
        x = x_btchw.permute(0, 2, 1, 3, 4)  # (B, C, T, H, W)
        return self.forward_head(self.forward_features(x), pre_logits=pre_logits)


# ------------------------------------------------------------------------------------------- checkpoint conversion


def _extract_state_dict(checkpoint: object, path: Path) -> dict[str, torch.Tensor]:
    """The weights of a released checkpoint: under ``model``, else ``module``, else the object itself."""
    if not isinstance(checkpoint, Mapping):
        raise GlitrError(f"{path}: not a VideoMAE checkpoint (holds a {type(checkpoint).__name__}, not a dict)")
    state = checkpoint
    for key in _STATE_DICT_KEYS:
        if key in checkpoint:
            state = checkpoint[key]
            break
    if not isinstance(state, Mapping):
        raise GlitrError(f"{path}: not a VideoMAE checkpoint (its weights are a {type(state).__name__}, not a dict)")
    bad = [str(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise GlitrError(f"{path}: not a VideoMAE state dict (non-tensor entries: {key_summary(bad)})")
    return dict(state)


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert a released VideoMAE state dict to this model's names: strip a ``backbone.``/``encoder.`` prefix.

    Everything else already matches (the released names are kept as they are).
    """
    out = {}
    for k, v in state_dict.items():
        for prefix in _STRIP_PREFIXES:
            if k.startswith(prefix):
                k = k[len(prefix) :]
                break
        out[k] = v
    return out


# ---------------------------------------------------------------------------------------------------------- builders


def build_videomae(num_classes: int = 174, **kw: Any) -> VideoMAE:
    """VideoMAE ViT-B/16 (16 frames, 224 px, tubelet 2) with ``num_classes`` outputs; ``kw`` overrides VideoMAE args."""
    return VideoMAE(num_classes=num_classes, **kw)


def load_videomae(path: Path, num_classes: int | None = None, **kw: Any) -> VideoMAE:
    """Build a VideoMAE and load a released fine-tuned checkpoint into it, strictly.

    The state dict is taken from ``checkpoint["model"]`` (plain training path), else ``checkpoint["module"]``
    (DeepSpeed, as in the SSv2 recipe), else the loaded object itself, with ``backbone.``/``encoder.`` prefixes
    stripped. ``num_classes=None`` takes the class count from the checkpoint's ``head.weight``. Unlike the original
    (non-strict) script, any missing, unexpected or misshaped key is a ``GlitrError``, so a head of the wrong size is
    reported rather than silently re-initialised. The returned model is in train mode; call ``freeze()`` for a teacher.
    """
    path = Path(path)
    checkpoint = read_checkpoint(path)
    state_dict = checkpoint_filter_fn(_extract_state_dict(checkpoint, path))
    if num_classes is None:
        head = state_dict.get("head.weight")
        num_classes = head.shape[0] if head is not None and head.ndim == 2 else 174
    # Every persistent tensor is about to be replaced: build on the meta device (no seconds spent on a random init
    # of 86M parameters), check the keys there, then adopt the loaded tensors (cast to the model's float32) without a
    # copy and refill the fixed pos_embed, the only tensor not in the checkpoint.
    with torch.device("meta"):
        model = build_videomae(num_classes=num_classes, **kw)
    model.to_empty(device="cpu")
    state_dict = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
    load_state_dict_checked(model, state_dict, f"{path} (VideoMAE)", assign=True)
    model.init_non_persistent_buffers()
    return model
