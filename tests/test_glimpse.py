import pytest
import torch

from glitr_cli.model import extract_glimpse, glimpse_area_fraction, glimpse_mask
from glitr_cli.model.glimpse import extract_glimpse_from_box, glimpse_read_box, read_box_size


def _ramp(h: int, w: int) -> torch.Tensor:
    rows = torch.arange(h, dtype=torch.float64)[:, None].expand(h, w)
    cols = torch.arange(w, dtype=torch.float64)[None, :].expand(h, w)
    return torch.stack([cols, rows, 3 * cols - 2 * rows])[None]  # (1, 3, H, W)


@pytest.mark.parametrize("hw", [(32, 32), (24, 40)])
def test_glimpse_samples_where_the_formula_says(hw):
    """Bilinear sampling reproduces linear images exactly, so each glimpse pixel must hold
    the column/row that the affine_grid convention (x horizontal, align_corners) predicts."""
    h, w = hw
    frame = _ramp(h, w)
    loc = torch.tensor([[0.3, -0.2]], dtype=torch.float64)
    scale, size = (0.5, 0.25), (6, 10)
    g = extract_glimpse(frame, loc, size, scale)[0]
    r = torch.arange(size[0], dtype=torch.float64)[:, None]
    c = torch.arange(size[1], dtype=torch.float64)[None, :]
    x = 0.3 + scale[0] * (-1 + 2 * c / (size[1] - 1))
    y = -0.2 + scale[1] * (-1 + 2 * r / (size[0] - 1))
    col, row = (x + 1) / 2 * (w - 1), (y + 1) / 2 * (h - 1)
    torch.testing.assert_close(g[0], col.expand(size), rtol=0, atol=1e-9)
    torch.testing.assert_close(g[1], row.expand(size), rtol=0, atol=1e-9)


def test_glimpse_outside_the_frame_reads_zeros_and_is_differentiable():
    frame = torch.rand(2, 3, 16, 16)
    far = torch.tensor([[5.0, 5.0], [-4.0, 0.0]])
    assert extract_glimpse(frame, far, (8, 8), (0.5, 0.5)).abs().max() == 0
    loc = torch.tensor([[0.1, -0.3], [0.0, 0.2]], requires_grad=True)
    extract_glimpse(frame, loc, (8, 8), (0.5, 0.5)).sum().backward()
    assert loc.grad is not None and loc.grad.abs().sum() > 0


def test_mask_covers_the_glimpse_footprint():
    h = w = 64
    loc = torch.tensor([[0.0, 0.0], [0.5, -0.5]], dtype=torch.float64)
    m = glimpse_mask(loc, (h, w), (16, 16), (0.25, 0.25))
    assert m.shape == (2, h, w)
    assert m[0, 32, 32] == 1 and m[0, 0, 0] == 0
    # 1 inside [l - s, l + s], falling off over one glimpse pixel: area close to (2s)^2 of the frame
    area = m.sum(dim=(1, 2)) / (h * w)
    assert torch.allclose(area, torch.full((2,), 0.25**2, dtype=torch.float64), atol=0.02)
    assert glimpse_area_fraction(224, 16, 6) == pytest.approx((96 / 224) ** 2)


def _cut(frames: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """The boxes (N, 4) of `frames` (N, C, H, W), zeros outside the frames."""
    h, w = frames.shape[-2:]
    x0, y0, x1, y1 = (int(v) for v in boxes[0])
    pad = max(0, -int(boxes[:, :2].min()), int(boxes[:, 2].max()) - w, int(boxes[:, 3].max()) - h)
    padded = torch.nn.functional.pad(frames, (pad, pad, pad, pad))
    return torch.stack(
        [padded[i, :, y0 + pad : y1 + pad, x0 + pad : x1 + pad] for i, (x0, y0, x1, y1) in enumerate(boxes.tolist())]
    )


@pytest.mark.parametrize("hw,scale", [((32, 32), (0.5, 0.5)), ((224, 224), (6 / 14, 6 / 14)), ((24, 40), (0.5, 0.25))])
def test_read_box_holds_every_pixel_a_glimpse_reads(hw, scale):
    """Zeroing every pixel outside the box leaves the glimpse unchanged (bit for bit), and the glimpse cut from
    the box alone equals the one from the whole frame; boxes have one size and may leave the frame."""
    h, w = hw
    g = torch.Generator().manual_seed(0)
    frames = torch.randn(64, 3, h, w, generator=g)
    loc = torch.cat([torch.rand(60, 2, generator=g) * 2.4 - 1.2, torch.tensor([[0.0, 0.0], [1.0, -1.0]] * 2)])
    size = (12, 12)
    boxes = glimpse_read_box(loc, (h, w), scale)
    assert {tuple(b) for b in (boxes[:, 2:] - boxes[:, :2]).tolist()} == {
        (read_box_size(w, scale[0]), read_box_size(h, scale[1]))
    }
    inside = torch.zeros(64, 1, h, w, dtype=torch.bool)
    for i, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        inside[i, :, max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)] = True
    full = extract_glimpse(frames, loc, size, scale)
    assert torch.equal(extract_glimpse(frames * inside, loc, size, scale), full)
    crops = _cut(frames, boxes)
    # the same samples, up to float32 rounding of their positions: a few 1e-5 px at 224 px (either path
    # is that far from float64), times the image's slope
    torch.testing.assert_close(
        extract_glimpse_from_box(crops, boxes, loc, (h, w), size, scale), full, atol=1e-4, rtol=0
    )


@pytest.mark.parametrize("hw,scale", [((32, 32), (0.5, 0.5)), ((224, 224), (6 / 14, 6 / 14)), ((24, 40), (0.5, 0.25))])
def test_separable_sampling_equals_grid_sample(hw, scale):
    """The exported graph's sampler (two matrix products) gives `extract_glimpse`'s glimpses, inside the
    frame, across its edges and outside it, from the whole frame and from the read box alone, for one image
    shared by every location (the position-embedding table) too."""
    from glitr_cli.model.glimpse import extract_glimpse_separable

    h, w = hw
    g = torch.Generator().manual_seed(1)
    frames = torch.randn(16, 3, h, w, generator=g, dtype=torch.float64)
    loc = torch.cat([torch.rand(12, 2, generator=g, dtype=torch.float64) * 2.6 - 1.3, torch.tensor([[5.0, 0.0]] * 4)])
    size = (12, 10)
    full = extract_glimpse(frames, loc, size, scale)
    torch.testing.assert_close(extract_glimpse_separable(frames, loc, size, scale), full, atol=1e-12, rtol=0)
    boxes = glimpse_read_box(loc, (h, w), scale)
    crops = _cut(frames, boxes)
    from_box = extract_glimpse_separable(crops, loc, size, scale, (h, w), boxes[:, :2])
    torch.testing.assert_close(from_box, full, atol=1e-9, rtol=0)
    shared = extract_glimpse_separable(frames[:1], loc, size, scale)
    torch.testing.assert_close(shared, extract_glimpse(frames[:1].expand(16, -1, -1, -1), loc, size, scale))
