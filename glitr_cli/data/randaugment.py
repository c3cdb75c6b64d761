"""RandAugment on uint8 clips, as the released GliTr drew it: timm's `rand-m7-n4-mstd0.5-inc1` (its
"increasing" op set, timm 0.4.9's argument formulas). The ops reproduce Pillow's, which timm applied to
each frame: point ops exactly, rotate, shear and translate by PyTorch's bicubic kernel (not quite
Pillow's; docs/training.md#what-still-differs-from-the-original) with a grey fill of 128; per-image
statistics are taken per frame. `RandAugment` draws its ops, magnitudes and signs once per clip.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from glitr_cli.errors import GlitrError

MAX_LEVEL = 10.0
FILL = 128  # the grey the geometric ops leave where the frame moved away


# -------------------------------------------------------------------------------------- point ops


def _blend(degenerate: torch.Tensor, clip: torch.Tensor, factor: float) -> torch.Tensor:
    """Pillow's `Image.blend(degenerate, clip, factor)`: float32 arithmetic, truncated, clipped.
    `degenerate` broadcasts against the clip."""
    d = degenerate.float()
    return (d + factor * (clip.float() - d)).clamp_(0, 255).to(torch.uint8)


def _grey(clip: torch.Tensor) -> torch.Tensor:
    """Pillow's RGB -> L conversion: (T, 3, H, W) uint8 -> (T, 1, H, W) int32."""
    r, g, b = clip.int().unbind(-3)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).unsqueeze(-3)


def _apply_luts(clip: torch.Tensor, luts: torch.Tensor) -> torch.Tensor:
    """Look each frame's channels up in their own table: luts (T, 3, 256) uint8."""
    t, c = clip.shape[:2]
    return torch.gather(luts, 2, clip.reshape(t, c, -1).long()).view_as(clip)


def auto_contrast(clip: torch.Tensor, _: None) -> torch.Tensor:
    """Stretch each frame's channels to 0..255 (Pillow's `ImageOps.autocontrast`)."""
    flat = clip.flatten(2)
    lo = flat.amin(2, keepdim=True).double()  # (T, 3, 1)
    hi = flat.amax(2, keepdim=True).double()
    scale = torch.full_like(hi, 255.0) / (hi - lo).clamp(min=1)  # a true division: `255.0 / x` multiplies by 1/x
    levels = torch.arange(256, dtype=torch.float64, device=clip.device)
    luts = (levels * scale - lo * scale).trunc().clamp(0, 255)
    luts = torch.where(hi > lo, luts, levels)  # a flat channel stays as it is
    return _apply_luts(clip, luts.to(torch.uint8))


def equalize(clip: torch.Tensor, _: None) -> torch.Tensor:
    """Equalise each frame's channel histograms (Pillow's `ImageOps.equalize`)."""
    t, c = clip.shape[:2]
    values = clip.reshape(t * c, -1).long()  # one row per frame and channel
    hist = torch.zeros(t * c, 256, dtype=torch.int64, device=clip.device)
    hist.scatter_add_(1, values, torch.ones(1, dtype=torch.int64, device=clip.device).expand_as(values))
    levels = torch.arange(256, device=clip.device)
    last = torch.where(hist > 0, levels, -1).amax(1, keepdim=True)  # the brightest value present
    step = (hist.sum(1, keepdim=True) - hist.gather(1, last)) // 255
    below = torch.cumsum(hist, 1) - hist  # pixels darker than each value
    luts = ((step // 2 + below) // step.clamp(min=1)).clamp(max=255)
    luts = torch.where(step > 0, luts, levels)  # one value, or too few pixels: unchanged
    return torch.gather(luts.to(torch.uint8), 1, values).view_as(clip)


def invert(clip: torch.Tensor, _: None) -> torch.Tensor:
    return 255 - clip


def posterize(clip: torch.Tensor, bits: int) -> torch.Tensor:
    """Keep the `bits` most significant bits."""
    return clip & (0xFF << (8 - bits) & 0xFF)


def solarize(clip: torch.Tensor, threshold: int) -> torch.Tensor:
    """Invert the values at or above `threshold` (256: none)."""
    if threshold > 255:  # a uint8 comparison with 256 would wrap to 0
        return clip
    return clip ^ (clip >= threshold).to(torch.uint8).mul_(255)  # x ^ 255 == 255 - x


def solarize_add(clip: torch.Tensor, add: int) -> torch.Tensor:
    """Add `add` (at most 128, so nothing passes 255) to the values below 128."""
    assert 0 <= add <= 128, add
    return clip + (clip < 128).to(torch.uint8).mul_(add)


def color(clip: torch.Tensor, factor: float) -> torch.Tensor:
    """Blend with the grey image: 0 grey, 1 unchanged, above 1 more saturated."""
    return _blend(_grey(clip), clip, factor)


def contrast(clip: torch.Tensor, factor: float) -> torch.Tensor:
    """Blend with each frame's mean grey level."""
    mean = (_grey(clip).double().flatten(1).mean(1) + 0.5).floor()  # (T,): Pillow rounds the mean
    return _blend(mean.view(-1, 1, 1, 1), clip, factor)


def brightness(clip: torch.Tensor, factor: float) -> torch.Tensor:
    """Blend with black."""
    return _blend(clip.new_zeros(()), clip, factor)


def sharpness(clip: torch.Tensor, factor: float) -> torch.Tensor:
    """Blend with Pillow's SMOOTH-filtered frame (3x3 kernel, 5 in the centre and 1 around, over 13;
    border pixels unfiltered): below 1 blurs, above 1 sharpens."""
    x = clip.short()  # exact sums, at most 13 * 255
    rows = x[..., :-2, :] + x[..., 1:-1, :] + x[..., 2:, :]  # (T, 3, H-2, W): 3x1 sums
    ring = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]  # (T, 3, H-2, W-2): 3x3 sums
    smooth = ((ring + 4 * x[..., 1:-1, 1:-1]).float() / 13 + 0.5).floor_()  # Pillow rounds the filter
    out = clip.clone()  # the border blends with itself: unchanged
    out[..., 1:-1, 1:-1] = _blend(smooth, clip[..., 1:-1, 1:-1], factor)
    return out


# ---------------------------------------------------------------------------------- geometric ops


def _affine(clip: torch.Tensor, matrix: Sequence[float]) -> torch.Tensor:
    """Pillow's `Image.transform(AFFINE, matrix, BICUBIC, fillcolor=128)`: output pixel centre (x, y)
    (pixel (0, 0) centred at (0.5, 0.5)) reads the input at (a x + b y + c, d x + e y + f); where
    that lies outside the frame, the output is grey. Resampled by `grid_sample` (bicubic, border)."""
    t, c, h, w = clip.shape
    a, b, cx, d, e, fy = matrix
    ys = torch.arange(h, dtype=torch.float64, device=clip.device).view(h, 1) + 0.5
    xs = torch.arange(w, dtype=torch.float64, device=clip.device).view(1, w) + 0.5
    x_in = a * xs + b * ys + cx  # (H, W)
    y_in = d * xs + e * ys + fy
    outside = (x_in < 0) | (x_in >= w) | (y_in < 0) | (y_in >= h)
    grid = torch.stack([2 * x_in / w - 1, 2 * y_in / h - 1], -1).float().unsqueeze(0)  # (1, H, W, 2)
    # one grid for every frame and channel; channels-last keeps a pixel's T x 3 values together
    frames = clip.reshape(1, t * c, h, w).float().contiguous(memory_format=torch.channels_last)  # (1, T*3, H, W)
    out = F.grid_sample(frames, grid, mode="bicubic", padding_mode="border", align_corners=False)
    out = out.round_().clamp_(0, 255).to(torch.uint8).masked_fill_(outside, FILL)
    return out.contiguous().view(t, c, h, w)


def rotate(clip: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate counter-clockwise about the frame centre (Pillow's `Image.rotate`)."""
    if degrees % 360 == 0:
        return clip
    h, w = clip.shape[-2:]
    angle = -math.radians(degrees)
    a, b = round(math.cos(angle), 15), round(math.sin(angle), 15)
    d, e = -b, a
    cx, cy = w / 2, h / 2
    return _affine(clip, (a, b, a * -cx + b * -cy + cx, d, e, d * -cx + e * -cy + cy))


def _cubic_weights(frac: torch.Tensor) -> torch.Tensor:
    """PyTorch's bicubic weights (a = -0.75, as `grid_sample`) of the taps at -1, 0, 1, 2 from a
    fractional position: (N,) -> (N, 4)."""
    a = -0.75
    d = torch.stack([1 + frac, frac, 1 - frac, 2 - frac], -1)  # distances to the taps
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return torch.where(d <= 1, near, far)


def _shift_rows(clip: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Row y of every frame reads the input at x + `shifts[y]` (pixels): the affine maps whose
    matrix moves only x (shear x, translate x), resampled as `_affine` does but with 4 taps in one
    direction instead of 16 in two. uint8 (T, 3, H, W), shifts (H,) float64."""
    h, w = clip.shape[-2:]
    source = torch.arange(w, dtype=torch.float64, device=clip.device) + shifts.view(h, 1)  # (H, W)
    outside = (source < -0.5) | (source >= w - 0.5)
    start = source.floor().long() - 1  # the first of the 4 taps
    weights = _cubic_weights(shifts - shifts.floor()).float().view(h, 1, 4)  # one fraction per row
    x = clip.float()
    out = torch.zeros_like(x)
    for k in range(4):
        taps = (start + k).clamp_(0, w - 1).expand_as(x)  # border pixels repeat
        out += weights[..., k] * x.gather(-1, taps)
    return out.round_().clamp_(0, 255).to(torch.uint8).masked_fill_(outside, FILL)


def shear_x(clip: torch.Tensor, factor: float) -> torch.Tensor:
    """Pillow's AFFINE (1, factor, 0, 0, 1, 0)."""
    h = clip.shape[-2]
    return _shift_rows(clip, factor * (torch.arange(h, dtype=torch.float64, device=clip.device) + 0.5))


def shear_y(clip: torch.Tensor, factor: float) -> torch.Tensor:
    """Pillow's AFFINE (1, 0, 0, factor, 1, 0): shear_x of the transposed frames."""
    return shear_x(clip.transpose(-1, -2).contiguous(), factor).transpose(-1, -2).contiguous()


def translate_x_rel(clip: torch.Tensor, fraction: float) -> torch.Tensor:
    """Move the frame left by `fraction` of its width (right when negative): AFFINE (1, 0, fraction
    W, 0, 1, 0)."""
    h, w = clip.shape[-2:]
    return _shift_rows(clip, torch.full((h,), fraction * w, dtype=torch.float64, device=clip.device))


def translate_y_rel(clip: torch.Tensor, fraction: float) -> torch.Tensor:
    """Move the frame up by `fraction` of its height: AFFINE (1, 0, 0, 0, 1, fraction H)."""
    return translate_x_rel(clip.transpose(-1, -2).contiguous(), fraction).transpose(-1, -2).contiguous()


# ------------------------------------------------------------------------------------------ the table


def _signed(scale: float) -> Callable[[float, bool], float]:
    return lambda level, negate: -(level / MAX_LEVEL * scale) if negate else level / MAX_LEVEL * scale


def _enhance(level: float, negate: bool) -> float:
    return max(0.1, 1.0 + _signed(0.9)(level, negate))


# name -> (op, its argument from a magnitude on the 0-10 scale and a sign), in timm's order
OPS: dict[str, tuple[Callable[[torch.Tensor, object], torch.Tensor], Callable[[float, bool], object]]] = {
    "AutoContrast": (auto_contrast, lambda level, negate: None),
    "Equalize": (equalize, lambda level, negate: None),
    "Invert": (invert, lambda level, negate: None),
    "Rotate": (rotate, _signed(30.0)),
    "PosterizeIncreasing": (posterize, lambda level, negate: 4 - int(level / MAX_LEVEL * 4)),
    "SolarizeIncreasing": (solarize, lambda level, negate: 256 - min(256, int(level / MAX_LEVEL * 256))),
    "SolarizeAdd": (solarize_add, lambda level, negate: min(128, int(level / MAX_LEVEL * 110))),
    "ColorIncreasing": (color, _enhance),
    "ContrastIncreasing": (contrast, _enhance),
    "BrightnessIncreasing": (brightness, _enhance),
    "SharpnessIncreasing": (sharpness, _enhance),
    "ShearX": (shear_x, _signed(0.3)),
    "ShearY": (shear_y, _signed(0.3)),
    "TranslateXRel": (translate_x_rel, _signed(0.45)),
    "TranslateYRel": (translate_y_rel, _signed(0.45)),
}


def op_argument(name: str, magnitude: float, negate: bool) -> object:
    """The argument op `name` takes at `magnitude` (0-10), negated when `negate` and the op has a sign
    (rotate, shear, translate, and the enhancements: factor 1 - x instead of 1 + x)."""
    return OPS[name][1](magnitude, negate)


def apply_op(clip: torch.Tensor, name: str, magnitude: float, negate: bool = False) -> torch.Tensor:
    """Apply op `name` at `magnitude` (0-10) to every frame of a uint8 clip (T, 3, H, W)."""
    op, _ = OPS[name]
    return op(clip, op_argument(name, magnitude, negate))


class RandAugment:
    """timm's RandAugment for a clip: `num_ops` ops drawn with replacement from `ops`, each applied
    with probability `prob` at a magnitude ~ N(`magnitude`, `magnitude_std`) clipped to [0, 10] and
    a random sign; every draw is made once per clip (torch's global generator), so all frames get
    the same ops and arguments."""

    def __init__(
        self,
        num_ops: int = 4,
        magnitude: float = 7.0,
        magnitude_std: float = 0.5,
        prob: float = 0.5,
        ops: Sequence[str] = tuple(OPS),
    ) -> None:
        if not 0 <= magnitude <= MAX_LEVEL:
            raise GlitrError(f"RandAugment magnitude must lie in [0, {MAX_LEVEL:g}], got {magnitude}")
        unknown = set(ops) - set(OPS)
        if unknown:
            raise GlitrError(f"unknown RandAugment ops {sorted(unknown)}; known: {', '.join(OPS)}")
        self.num_ops = num_ops
        self.magnitude = float(magnitude)
        self.magnitude_std = float(magnitude_std)
        self.prob = float(prob)
        self.ops = tuple(ops)

    def sample_magnitude(self) -> float:
        """N(magnitude, magnitude_std) clipped to [0, 10]."""
        level = self.magnitude + self.magnitude_std * float(torch.randn(()))
        return min(MAX_LEVEL, max(0.0, level))

    def __call__(self, clip: torch.Tensor) -> torch.Tensor:
        for k in torch.randint(len(self.ops), (self.num_ops,)).tolist():
            if float(torch.rand(())) >= self.prob:
                continue
            magnitude = self.sample_magnitude()
            clip = apply_op(clip, self.ops[k], magnitude, negate=bool(torch.rand(()) < 0.5))
        return clip
