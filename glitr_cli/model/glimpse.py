"""Glimpses: differentiable crops of a frame at a location, and their footprint on the frame.

A location l = (x, y) lives in the normalised coordinates of `F.affine_grid` with
`align_corners=True`: -1 is the centre of the first pixel, +1 the centre of the last, x runs
along columns, (0, 0) is the frame centre. A glimpse of g patches of p pixels covers the
fraction s = g / n of each axis, where n = frame_size / p is the patch grid. Locations are
never clamped; a glimpse that leaves the frame reads zeros there.

`glimpse_read_box` gives the pixels a glimpse's bilinear samples read, so a caller can hand
over just those (`extract_glimpse_from_box`) instead of the whole frame.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def glimpse_theta(loc: torch.Tensor, scale: tuple[float, float]) -> torch.Tensor:
    """Affine matrices [[s_x, 0, x], [0, s_y, y]] for locations `loc` (N, 2) -> (N, 2, 3)."""
    n = loc.shape[0]
    theta = loc.new_zeros(n, 2, 3)
    theta[:, 0, 0] = scale[0]
    theta[:, 1, 1] = scale[1]
    theta[:, :, 2] = loc
    return theta


def extract_glimpse(
    frames: torch.Tensor, loc: torch.Tensor, size: tuple[int, int], scale: tuple[float, float]
) -> torch.Tensor:
    """Bilinearly sample glimpses from `frames` (N, C, H, W) at `loc` (N, 2).

    `size` is the output (height, width) in samples, `scale` the (s_x, s_y) fraction of the
    frame covered. Differentiable with respect to both frames and locations. Returns
    (N, C, size[0], size[1]).
    """
    theta = glimpse_theta(loc.to(frames.dtype), scale)
    grid = F.affine_grid(theta, [frames.shape[0], frames.shape[1], size[0], size[1]], align_corners=True)
    return F.grid_sample(frames, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def sample_pixels(loc: torch.Tensor, scale: float, samples: int, pixels: int) -> torch.Tensor:
    """Where a glimpse's samples fall along one axis of `pixels` pixels, in pixels (integers are pixel centres),
    for locations `loc` (N,) on that axis: what `extract_glimpse`'s grid says, (N, samples)."""
    base = torch.linspace(-1, 1, samples, dtype=loc.dtype, device=loc.device)
    return (loc[:, None] + scale * base + 1) / 2 * (pixels - 1)


def bilinear_matrix(positions: torch.Tensor, pixels: int) -> torch.Tensor:
    """Bilinear interpolation along one axis as a matrix: sample positions (N, g) in pixels -> weights
    (N, g, pixels), max(0, 1 - |position - pixel|): the two pixels around each sample, none outside the axis
    (zeros padding)."""
    grid = torch.arange(pixels, dtype=positions.dtype, device=positions.device)
    return (1 - (positions[..., None] - grid).abs()).clamp(min=0)


def extract_glimpse_separable(
    images: torch.Tensor,
    loc: torch.Tensor,
    size: tuple[int, int],
    scale: tuple[float, float],
    frame_size: tuple[int, int] | None = None,
    origin: torch.Tensor | None = None,
) -> torch.Tensor:
    """`extract_glimpse` as two matrix products, the same samples up to float rounding: a glimpse's grid is
    axis-aligned, so bilinear sampling is `rows @ image @ columns^T` with the weights of `bilinear_matrix`.
    Cheaper than a general sampler where one is slow (ONNX Runtime's GridSample and the affine_grid it
    needs). `images` (N or 1, C, H, W); with `origin` (N, 2) they are crops whose first pixel is (x, y) of
    frames of `frame_size` (H, W), as `extract_glimpse_from_box` takes them. Returns (N, C, size[0], size[1])."""
    h, w = images.shape[-2:]
    frame_h, frame_w = frame_size or (h, w)
    loc = loc.to(images.dtype)
    xs = sample_pixels(loc[:, 0], scale[0], size[1], frame_w)  # (N, gx)
    ys = sample_pixels(loc[:, 1], scale[1], size[0], frame_h)  # (N, gy)
    if origin is not None:
        xs, ys = xs - origin[:, :1].to(xs), ys - origin[:, 1:].to(ys)
    rows, columns = bilinear_matrix(ys, h)[:, None], bilinear_matrix(xs, w)[:, None]  # (N, 1, g, H or W)
    return rows @ images @ columns.transpose(-1, -2)


READ_MARGIN = 1e-3  # pixels: covers the float rounding of the sample positions in grid_sample


def read_box_size(frame_size: int, scale: float) -> int:
    """Side in pixels of every `glimpse_read_box` along an axis of `frame_size` pixels for a glimpse of
    `scale`: the samples span s * (frame_size - 1) pixels, and bilinear reads one more on either side."""
    return math.ceil(scale * (frame_size - 1) + 2 * READ_MARGIN) + 2


def glimpse_read_box(loc: torch.Tensor, frame_size: tuple[int, int], scale: tuple[float, float]) -> torch.Tensor:
    """The pixels that glimpses at `loc` (N, 2) read from frames of `frame_size` (H, W): boxes (N, 4) int64
    (x0, y0, x1, y1), end exclusive, in frame pixels (integers are pixel centres).

    Every box has the same size (`read_box_size` per axis), so the crops of a batch stack. A box may
    reach outside the frame: those pixels must be zeros, which is what `extract_glimpse` reads there.
    """
    boxes = []
    for axis, (n, s) in enumerate(zip((frame_size[1], frame_size[0]), scale, strict=True)):
        first = (loc[:, axis].double() - s + 1) / 2 * (n - 1)  # the first sample, in pixels
        start = torch.floor(first - READ_MARGIN).long()
        boxes.append((start, start + read_box_size(n, s)))
    (x0, x1), (y0, y1) = boxes
    return torch.stack([x0, y0, x1, y1], dim=1)


def extract_glimpse_from_box(
    crops: torch.Tensor,
    box: torch.Tensor,
    loc: torch.Tensor,
    frame_size: tuple[int, int],
    size: tuple[int, int],
    scale: tuple[float, float],
) -> torch.Tensor:
    """`extract_glimpse` from the pixels of `glimpse_read_box` alone: `crops` (N, C, h, w) are the
    boxes `box` (N, 4) of frames of `frame_size` (H, W), zeros outside the frame. Same samples, same
    bilinear weights, up to the rounding of the sample positions. Returns (N, C, size[0], size[1])."""
    theta = glimpse_theta(loc.to(crops.dtype), scale)
    grid = F.affine_grid(theta, [crops.shape[0], crops.shape[1], size[0], size[1]], align_corners=True)
    h, w = crops.shape[-2:]
    # the frame's sample grid moved into the crop's coordinates, in float64 to add no rounding of its own
    exact = grid.double()
    frame_wh = exact.new_tensor([frame_size[1] - 1, frame_size[0] - 1])
    pixels = (exact + 1) / 2 * frame_wh - box[:, None, None, :2].to(exact)  # (N, h, w, 2) in crop pixels
    grid = (pixels / exact.new_tensor([w - 1, h - 1]) * 2 - 1).to(grid.dtype)
    return F.grid_sample(crops, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def glimpse_mask(
    loc: torch.Tensor, frame_size: tuple[int, int], glimpse_pixels: tuple[int, int], scale: tuple[float, float]
) -> torch.Tensor:
    """Footprint of glimpses at `loc` (N, 2) on frames of `frame_size` (H, W) -> (N, H, W).

    The inverse of the glimpse map sends an all-ones glimpse back onto the frame, so the mask
    is 1 inside [l - s, l + s] and falls off linearly over one glimpse pixel outside it.
    """
    n = loc.shape[0]
    theta = loc.new_zeros(n, 2, 3)
    theta[:, 0, 0] = 1.0 / scale[0]
    theta[:, 1, 1] = 1.0 / scale[1]
    theta[:, 0, 2] = -loc[:, 0] / scale[0]
    theta[:, 1, 2] = -loc[:, 1] / scale[1]
    grid = F.affine_grid(theta, [n, 1, frame_size[0], frame_size[1]], align_corners=True)
    ones = loc.new_ones(n, 1, glimpse_pixels[0], glimpse_pixels[1])
    return F.grid_sample(ones, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[:, 0]


def glimpse_area_fraction(img_size: int, patch_size: int, glimpse_size: int) -> float:
    """Fraction of a square frame's area that one glimpse of `glimpse_size` patches covers."""
    return (glimpse_size * patch_size) ** 2 / img_size**2
