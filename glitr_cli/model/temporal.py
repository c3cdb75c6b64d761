"""T_c and T_l: causal temporal transformers over the sequence of per-frame features.

Each projects D-dim features to the temporal width (Linear + LayerNorm, identity when equal),
adds a learned temporal embedding, runs pre-norm blocks with causal self-attention, a final
LayerNorm and a head. `forward` is one causal pass over a whole sequence; `step` appends one
time step to a `KVCache` and returns the output of that step alone. Because attention is
causal, the two give the same numbers, and `step` costs O(t) instead of re-running the prefix.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models import checkpoint_seq, named_apply
from timm.models.vision_transformer import init_weights_vit_timm


class KVCache:
    """Keys and values of every block for the time steps seen so far, one entry per block.

    Tensors are (B, heads, t, head_dim); appending concatenates, which keeps autograd intact
    so the same cache serves inference and the student's training loop.
    """

    def __init__(self, depth: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * depth
        self.values: list[torch.Tensor | None] = [None] * depth

    def __len__(self) -> int:
        k = self.keys[0]
        return 0 if k is None else k.shape[2]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class StaticKVCache:
    """Inference cache with fixed storage: step t writes position t in place and attends over 0..t.

    Storage (depth, B, heads, max_len, head_dim) is allocated at the first append with the keys'
    dtype and device. Every tensor shape depends only on t, so each step can be captured once in
    a CUDA graph and replayed. Not for training: the in-place writes would break autograd.
    """

    def __init__(self, depth: int, max_len: int) -> None:
        self.depth, self.max_len = depth, max_len
        self.length = 0
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.length

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys is None or self.keys.shape[1:3] != k.shape[:2] or self.keys.dtype != k.dtype:
            b, h, _, d = k.shape
            self.keys = k.new_zeros(self.depth, b, h, self.max_len, d)
            self.values = torch.zeros_like(self.keys)
        end = self.length + k.shape[2]
        self.keys[layer, :, :, self.length : end] = k
        self.values[layer, :, :, self.length : end] = v
        if layer == self.depth - 1:
            self.length = end
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]


class SlotKVCache:
    """A cache of `max_len` slots passed into a stateless step and out of it (an exported graph keeps no
    state): `keys` and `values` (depth, B, heads, max_len, head_dim) and the slot `position` (1,) int64
    the step writes. Every shape is fixed: the step's query attends over all slots, those after
    `position` masked out (`visible`), so it computes what a `StaticKVCache` of `position` steps does.
    After the step `keys` and `values` are the new cache (`stacked`)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, position: torch.Tensor) -> None:
        self.keys, self.values = list(keys.unbind(0)), list(values.unbind(0))
        self.position = position
        slots = torch.arange(keys.shape[3], device=keys.device)
        self.written = (slots == position)[:, None]  # (max_len, 1): the slot this step writes
        self.visible = (slots <= position)[None]  # (1, max_len): the slots its query sees

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys[layer] = torch.where(self.written, k, self.keys[layer])  # k (B, H, 1, hd) into its slot
        self.values[layer] = torch.where(self.written, v, self.values[layer])
        return self.keys[layer], self.values[layer]

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The cache after the step: keys and values (depth, B, heads, max_len, head_dim)."""
        return torch.stack(self.keys), torch.stack(self.values)


Cache = KVCache | StaticKVCache | SlotKVCache


class CausalAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, fused_attn: bool = True) -> None:
        super().__init__()
        assert dim % num_heads == 0, "dim must be divisible by num_heads"
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused_attn = fused_attn
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cache: Cache | None = None, layer: int = 0) -> torch.Tensor:
        b, t, c = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, t, hd)
        if cache is not None:
            k, v = cache.append(layer, k, v)  # (B, H, past + t, hd); a SlotKVCache: (B, H, max_len, hd)
        past = k.shape[2] - t
        # query i (absolute position past + i) may see keys 0..past + i
        mask = None
        if isinstance(cache, SlotKVCache):
            mask = cache.visible
        elif t > 1:
            mask = torch.ones(t, past + t, dtype=torch.bool, device=x.device).tril(diagonal=past)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, H, t, past + t)
            if mask is not None:
                attn = attn.masked_fill(~mask, float("-inf"))
            x = attn.softmax(dim=-1) @ v
        x = x.transpose(1, 2).reshape(b, t, c)  # (B, t, C)
        return self.proj(x)


class CausalBlock(nn.Module):
    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0, fused_attn: bool = True
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = CausalAttention(dim, num_heads, fused_attn=fused_attn)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor, cache: Cache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), cache, layer))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class TemporalTransformer(nn.Module):
    """Causal transformer over (B, T, in_dim) features with a head of `out_dim` outputs per step."""

    def __init__(
        self,
        in_dim: int,
        dim: int,
        out_dim: int,
        max_len: int,
        depth: int = 4,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        head_bias: bool = True,
        fused_attn: bool = True,
    ) -> None:
        super().__init__()
        self.max_len = max_len
        self.input_proj = (
            nn.Sequential(nn.Linear(in_dim, dim), nn.LayerNorm(dim, eps=1e-6)) if in_dim != dim else nn.Identity()
        )
        self.temporal_embed = nn.Parameter(torch.zeros(1, max_len, dim))
        rates = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.ModuleList(CausalBlock(dim, num_heads, mlp_ratio, r, fused_attn) for r in rates)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, out_dim, bias=head_bias)
        self.grad_checkpointing = False
        trunc_normal_(self.temporal_embed, std=0.02)
        named_apply(init_weights_vit_timm, self)  # trunc-normal(0.02) linears, zero biases, unit LayerNorms

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def no_weight_decay(self) -> set[str]:
        """Parameters that an optimiser excluding embeddings from weight decay leaves undecayed (timm's API)."""
        return {"temporal_embed"}

    def set_fused_attn(self, enabled: bool) -> None:
        for block in self.blocks:
            block.attn.fused_attn = enabled

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the blocks' activations in the backward pass of `forward` (only where the weights get
        gradients). `step` keeps them: a recompute would append to its cache a second time."""
        self.grad_checkpointing = enable

    def new_cache(self) -> KVCache:
        return KVCache(self.depth)

    def new_static_cache(self) -> StaticKVCache:
        return StaticKVCache(self.depth, self.max_len)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One causal pass: (B, T, in_dim) -> (B, T, out_dim); output t depends on inputs 0..t only."""
        t = x.shape[1]
        x = self.input_proj(x) + self.temporal_embed[:, :t]
        if self.grad_checkpointing and torch.is_grad_enabled() and self.temporal_embed.requires_grad:  # see spatial.py
            x = checkpoint_seq(self.blocks, x, use_reentrant=False)
        else:
            for block in self.blocks:
                x = block(x)
        return self.head(self.norm(x))

    def step(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        """Append one time step (B, in_dim) to `cache` and return its output (B, out_dim)."""
        if isinstance(cache, SlotKVCache):
            embed = self.temporal_embed.index_select(1, cache.position)  # (1, 1, dim)
        else:
            t = len(cache)
            if t >= self.max_len:
                raise ValueError(f"the temporal transformer holds at most {self.max_len} steps")
            embed = self.temporal_embed[:, t : t + 1]
        x = self.input_proj(x[:, None]) + embed  # (B, 1, dim)
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i)
        return self.head(self.norm(x))[:, 0]


class Locator(TemporalTransformer):
    """T_l: a temporal transformer whose head (no bias, initial weights ×0.1) gives the next (x, y).

    `init_loc` (1, 1, 2) is the learned location of the first glimpse.
    """

    def __init__(self, in_dim: int, dim: int, max_len: int, **kwargs) -> None:
        super().__init__(in_dim, dim, 2, max_len, head_bias=False, **kwargs)
        self.init_loc = nn.Parameter(torch.zeros(1, 1, 2))
        with torch.no_grad():
            self.head.weight.mul_(0.1)

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"init_loc"}
