"""Clip transforms (torchvision.transforms.v2) that give every frame of a clip the same
parameters: a clip is one tensor (T, 3, H, W), and v2 transforms draw their random
parameters once per call and apply them to all leading dimensions.

Training (the released GliTr/VideoMAE recipe): RandAugment m7 n4 with magnitude noise
(mstd 0.5), random-resized crop (scale 0.08-1, ratio 3/4-4/3, bicubic), no horizontal flip
(left/right changes the label in SSv2 and Jester), optional random erasing, ImageNet
normalisation. Evaluation: resize the short side, centre crop, normalise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torchvision.transforms import v2

from glitr_cli.errors import GlitrError
from glitr_cli.recipe import DataConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_FILL = [round(255 * m) for m in IMAGENET_MEAN]  # geometric ops fill with the mean colour


class ClipRandAugment(v2.RandAugment):
    """RandAugment for a whole clip, with per-clip magnitude noise.

    Magnitudes use the 0-10 scale of the RandAugment paper and timm (`m7` = 70 % of each
    op's maximum, e.g. rotate 21 of 30 degrees). For each of the `num_ops` ops drawn, a
    magnitude ~ N(`magnitude`, `magnitude_std`) clipped to [0, 10] is sampled once per call
    (so once per clip, shared by all frames) and the op is applied with probability
    `prob` (0.5 in timm's `rand-m7-n4-mstd0.5` policy the released scripts use). The op
    set and each op's range are torchvision's. Input: uint8 (..., 3, H, W)."""

    MAX_LEVEL = 10.0
    _BINS = 1001  # magnitudes are read off torchvision's ranges at 0.1 % resolution

    def __init__(
        self,
        num_ops: int = 4,
        magnitude: float = 7.0,
        magnitude_std: float = 0.5,
        prob: float = 0.5,
        interpolation: v2.InterpolationMode = v2.InterpolationMode.BILINEAR,
        fill: Any = _FILL,
    ) -> None:
        super().__init__(
            num_ops=num_ops, magnitude=0, num_magnitude_bins=self._BINS, interpolation=interpolation, fill=fill
        )
        if not 0 <= magnitude <= self.MAX_LEVEL:
            raise GlitrError(f"RandAugment magnitude must lie in [0, {self.MAX_LEVEL:g}], got {magnitude}")
        self.level = float(magnitude)
        self.level_std = float(magnitude_std)
        self.prob = float(prob)

    def sample_level(self) -> float:
        """One magnitude on the 0-10 scale: N(magnitude, magnitude_std) clipped to [0, 10]."""
        level = self.level
        if self.level_std > 0:
            level += self.level_std * float(torch.randn(()))
        return min(self.MAX_LEVEL, max(0.0, level))

    def op_magnitude(self, op: str, level: float, height: int, width: int) -> float:
        """The unsigned magnitude of `op` at `level` (0-10) on a height x width frame: the
        point `level / 10` along torchvision's range for that op (0 for ops without one)."""
        magnitudes = self._AUGMENTATION_SPACE[op][0](self._BINS, height, width)
        if magnitudes is None:
            return 0.0
        return float(magnitudes[round(level / self.MAX_LEVEL * (self._BINS - 1))])

    def forward(self, *inputs: Any) -> Any:
        flat_inputs_with_spec, clip = self._flatten_and_extract_image_or_video(inputs)
        height, width = clip.shape[-2:]
        for _ in range(self.num_ops):
            op, (_, signed) = self._get_random_item(self._AUGMENTATION_SPACE)
            level = self.sample_level()  # once per clip: every frame gets this magnitude
            if float(torch.rand(())) >= self.prob:
                continue
            magnitude = self.op_magnitude(op, level, height, width)
            if signed and float(torch.rand(())) <= 0.5:
                magnitude = -magnitude
            clip = self._apply_image_or_video_transform(
                clip, op, magnitude, interpolation=self.interpolation, fill=self._fill
            )
        return self._unflatten_and_insert_image_or_video(flat_inputs_with_spec, clip)


def _normalize() -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def train_transform(
    size: int,
    randaug_m: float = 7,
    randaug_n: int = 4,
    randaug_mstd: float = 0.5,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    erase_prob: float = 0.0,
    randaug_prob: float = 0.5,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Training transform: uint8 clip (T, 3, H, W) -> normalised float32 (T, 3, size, size).

    RandAugment (`randaug_n` ops at magnitude `randaug_m` +- `randaug_mstd` on the 0-10
    scale, each applied with `randaug_prob`; `randaug_n=0` disables it), random-resized
    crop (bicubic), ImageNet normalisation, then random erasing with `erase_prob` (random
    normal values, as timm's 'pixel' mode). Every random parameter is drawn once per clip.
    No flip: left/right changes the label."""
    ops: list[v2.Transform] = []
    if randaug_n > 0:
        ops.append(ClipRandAugment(randaug_n, randaug_m, randaug_mstd, randaug_prob))
    ops.append(
        v2.RandomResizedCrop(size, scale=scale, ratio=ratio, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
    )
    ops += _normalize()
    if erase_prob > 0:
        ops.append(v2.RandomErasing(p=erase_prob, value="random"))
    return v2.Compose(ops)


def eval_transform(size: int, resize: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Evaluation transform: uint8 clip (T, 3, H, W) -> normalised float32 (T, 3, size, size):
    resize so the short side is `resize` (bilinear), centre crop `size`, normalise."""
    if resize < size:
        raise GlitrError(f"eval resize ({resize}) must be at least the crop size ({size})")
    return v2.Compose(
        [
            v2.Resize(resize, interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
            v2.CenterCrop(size),
            *_normalize(),
        ]
    )


def denormalize(
    x: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> torch.Tensor:
    """Undo the normalisation for display: (..., 3, H, W) float -> same shape in [0, 1]."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x * s + m).clamp(0.0, 1.0)


def clip_train_transform(cfg: DataConfig) -> Callable[[torch.Tensor], torch.Tensor]:
    """The training transform a recipe's `data` section describes."""
    return train_transform(
        cfg.img_size,
        randaug_m=cfg.randaug_m,
        randaug_n=cfg.randaug_n,
        randaug_mstd=cfg.randaug_mstd,
        scale=cfg.scale,
        ratio=cfg.ratio,
        erase_prob=cfg.erase_prob,
        randaug_prob=cfg.randaug_prob,
    )
