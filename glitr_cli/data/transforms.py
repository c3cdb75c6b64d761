"""Clip transforms on one tensor (T, 3, H, W), every random parameter drawn once per clip so all its frames
get the same augmentation. Training (the released GliTr/VideoMAE recipe): RandAugment on the uint8
frames, a random-resized crop (`data.crop_resize`), ImageNet normalisation, optional random erasing, no
horizontal flip (left/right changes the label in SSv2 and Jester). Evaluation: resize the short side
(bicubic, antialiased), centre crop, normalise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torchvision import transforms as tv
from torchvision.transforms import v2

from glitr_cli.data.randaugment import RandAugment
from glitr_cli.errors import GlitrError
from glitr_cli.recipe import DataConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(clip: torch.Tensor) -> torch.Tensor:
    """Grey levels 0..255 (uint8, or float from resampling them) (..., 3, H, W) -> float32 scaled to
    [0, 1] and ImageNet-normalised, as one multiply and one subtraction per value."""
    std = torch.tensor(IMAGENET_STD, device=clip.device).view(3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN, device=clip.device).view(3, 1, 1)
    return clip.mul(1 / (255 * std)).sub_(mean / std)


class ClipTrainTransform:
    """Training transform: uint8 clip (T, 3, H, W) -> normalised float32 (T, 3, size, size).

    `randaugment` (None: off), then `crop` (a box of area `scale` and aspect `ratio` resized the
    `crop_resize` way), then random erasing with `erase_prob` (random normal values, as timm's
    'pixel' mode)."""

    def __init__(
        self,
        size: int,
        randaugment: RandAugment | None,
        scale: tuple[float, float],
        ratio: tuple[float, float],
        crop_resize: Literal["original", "antialiased"],
        erase_prob: float,
    ) -> None:
        if crop_resize not in ("original", "antialiased"):
            raise GlitrError(f"unknown crop_resize {crop_resize!r}: original or antialiased")
        self.size = size
        self.randaugment = randaugment
        self.scale = scale
        self.ratio = ratio
        self.crop_resize = crop_resize
        self.erase = v2.RandomErasing(p=erase_prob, value="random") if erase_prob > 0 else None

    def crop(self, clip: torch.Tensor, box: tuple[int, int, int, int] | None = None) -> torch.Tensor:
        """Cut box (top, left, height, width) out of every frame (a random one when None) and resize
        it to size x size: uint8 (T, 3, H, W) -> normalised float32 (T, 3, size, size)."""
        if box is None:
            box = tv.RandomResizedCrop.get_params(clip, list(self.scale), list(self.ratio))
        top, left, height, width = box
        if self.crop_resize == "antialiased":
            out = v2.functional.resized_crop(
                clip, top, left, height, width, [self.size, self.size], v2.InterpolationMode.BICUBIC, antialias=True
            )
            return normalize(out)
        # the release resized the normalised frames; bilinear weights sum to 1, so resizing first and
        # normalising the small output is the same map (to float rounding) at a fraction of the cost
        t, c = clip.shape[:2]
        pixels = clip[..., top : top + height, left : left + width].float().reshape(t * c, 1, height, width)
        out = F.interpolate(pixels, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return normalize(out.view(t, c, self.size, self.size))

    def __call__(self, clip: torch.Tensor) -> torch.Tensor:
        if self.randaugment is not None:
            clip = self.randaugment(clip)
        out = self.crop(clip)
        return self.erase(out) if self.erase is not None else out


def train_transform(
    size: int,
    randaug_m: float = 7,
    randaug_n: int = 4,
    randaug_mstd: float = 0.5,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    erase_prob: float = 0.0,
    randaug_prob: float = 0.5,
    crop_resize: Literal["original", "antialiased"] = "original",
) -> ClipTrainTransform:
    """The training transform: RandAugment (`randaug_n` ops at magnitude `randaug_m` +-
    `randaug_mstd` on the 0-10 scale, each applied with `randaug_prob`; `randaug_n=0` disables it),
    the random-resized crop, random erasing with `erase_prob`."""
    randaugment = RandAugment(randaug_n, randaug_m, randaug_mstd, randaug_prob) if randaug_n > 0 else None
    return ClipTrainTransform(size, randaugment, scale, ratio, crop_resize, erase_prob)


def eval_resize(resize: int) -> v2.Resize:
    """Evaluation's first stage: the short side to `resize` pixels, bicubic, antialiased, uint8 kept."""
    return v2.Resize(resize, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)


def eval_transform(size: int, resize: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Evaluation transform: uint8 clip (T, 3, H, W) -> normalised float32 (T, 3, size, size):
    resize so the short side is `resize` (bicubic, antialiased, back to uint8), centre crop `size`,
    normalise."""
    if resize < size:
        raise GlitrError(f"eval resize ({resize}) must be at least the crop size ({size})")
    return v2.Compose(
        [
            eval_resize(resize),
            v2.CenterCrop(size),
            normalize,
        ]
    )


@dataclass(frozen=True)
class CentreCrop:
    """Evaluation preprocessing of W x H frames whose short side already is `resize`: the resize keeps
    them as they are, so it is a centre crop of `size` (offset round((W - size) / 2), as torchvision's
    `CenterCrop`) and normalisation. A box of model-input pixels (`OnlinePredictor.next_box`) is then a
    box of source pixels, shifted: the caller reads only those (`source_box`) and `model_pixels`
    turns them into the crop `OnlinePredictor.step(crop=...)` takes."""

    width: int
    height: int
    size: int
    left: int
    top: int

    @classmethod
    def of(cls, width: int, height: int, size: int, resize: int) -> CentreCrop:
        if min(width, height) != resize:
            raise GlitrError(
                f"glimpse-only input reads the frames as they are: their short side must be the evaluation "
                f"resize ({resize} px), not {min(width, height)}; resize the frames first"
            )
        return cls(width, height, size, int(round((width - size) / 2.0)), int(round((height - size) / 2.0)))

    def source_box(self, box: Sequence[int]) -> tuple[int, int, int, int]:
        """Model-input box (x0, y0, x1, y1), end exclusive -> the source pixels it needs, the part of it
        inside the model input, shifted by the crop offset (may be empty: x0 == x1)."""
        x0, y0, x1, y1 = (int(v) for v in box)
        cx0, cx1 = min(max(x0, 0), self.size), min(max(x1, 0), self.size)
        cy0, cy1 = min(max(y0, 0), self.size), min(max(y1, 0), self.size)
        return cx0 + self.left, cy0 + self.top, cx1 + self.left, cy1 + self.top

    def model_pixels(self, pixels: torch.Tensor, box: Sequence[int]) -> torch.Tensor:
        """The source pixels of `source_box(box)`, uint8 (3, h, w) -> the normalised model-input box
        (3, y1 - y0, x1 - x0), zeros where it leaves the model input (what a glimpse reads there)."""
        x0, y0, x1, y1 = (int(v) for v in box)
        sx0, sy0, sx1, sy1 = self.source_box(box)
        if tuple(pixels.shape) != (3, sy1 - sy0, sx1 - sx0):
            raise GlitrError(f"expected the source pixels of {self.source_box(box)}, got shape {tuple(pixels.shape)}")
        out = torch.zeros(3, y1 - y0, x1 - x0, device=pixels.device)
        u0, v0 = sx0 - self.left - x0, sy0 - self.top - y0  # where the source pixels sit in the box
        out[:, v0 : v0 + pixels.shape[1], u0 : u0 + pixels.shape[2]] = normalize(pixels)
        return out


def denormalize(
    x: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> torch.Tensor:
    """Undo the normalisation for display: (..., 3, H, W) float -> same shape in [0, 1]."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x * s + m).clamp(0.0, 1.0)


def clip_train_transform(cfg: DataConfig) -> ClipTrainTransform:
    """The training transform a recipe's `data` section describes."""
    keys = ("randaug_m", "randaug_n", "randaug_mstd", "randaug_prob", "scale", "ratio", "crop_resize", "erase_prob")
    return train_transform(cfg.img_size, **{k: getattr(cfg, k) for k in keys})
