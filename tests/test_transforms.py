"""Clip transforms: one set of random parameters per clip, honest magnitude noise, no flip.
(`test_reference_training.py` checks each op and the crops against the original release.)"""

import pytest
import torch
from data_helpers import make_frames
from torchvision.transforms import v2

from glitr_cli.data.randaugment import OPS, RandAugment, apply_op, op_argument
from glitr_cli.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    denormalize,
    eval_transform,
    train_transform,
)
from glitr_cli.errors import GlitrError


def _clip(t: int = 6, h: int = 60, w: int = 80, seed: int = 0) -> torch.Tensor:
    """uint8 (T, 3, H, W) with different frames."""
    return torch.from_numpy(make_frames(t, h, w, seed)).permute(0, 3, 1, 2).contiguous()


def test_training_transform_applies_identical_parameters_to_every_frame():
    # identical frames must stay identical through RandAugment (all ops, high magnitude),
    # the random-resized crop and random erasing: any per-frame draw would break this
    frame = _clip(1)
    clip = frame.repeat(5, 1, 1, 1)
    tf = train_transform(32, randaug_m=9, randaug_n=4, randaug_prob=1.0, erase_prob=0.5)
    for seed in range(40):
        torch.manual_seed(seed)
        out = tf(clip)
        assert out.shape == (5, 3, 32, 32) and out.dtype == torch.float32
        assert all(torch.equal(out[0], out[t]) for t in range(1, 5)), f"seed {seed}"


def test_training_crop_has_identical_geometry_on_different_frames():
    # red/green encode the pixel coordinates, blue differs per frame: the crop resamples
    # channels independently, so equal red/green outputs mean the same crop box
    t, h, w = 4, 48, 64
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    clip = torch.empty(t, 3, h, w, dtype=torch.uint8)
    clip[:, 0] = (xx * 4).to(torch.uint8)
    clip[:, 1] = (yy * 5).to(torch.uint8)
    clip[:, 2] = torch.randint(0, 256, (t, h, w), dtype=torch.uint8)
    tf = train_transform(24, randaug_n=0)
    crops = set()
    for seed in range(20):
        torch.manual_seed(seed)
        out = tf(clip)
        assert all(torch.equal(out[0, :2], out[i, :2]) for i in range(1, t))
        assert not torch.equal(out[0, 2], out[1, 2])
        crops.add(round(float(out[0, 0].mean()), 3))
    assert len(crops) > 10  # the crop does change from clip to clip


def test_magnitude_noise_is_drawn_per_clip_and_clipped():
    torch.manual_seed(0)
    ra = RandAugment(num_ops=4, magnitude=7, magnitude_std=0.5)
    levels = torch.tensor([ra.sample_magnitude() for _ in range(4000)])
    assert abs(levels.mean() - 7) < 0.05 and abs(levels.std() - 0.5) < 0.03
    high = RandAugment(magnitude=9.8, magnitude_std=0.5)
    levels = torch.tensor([high.sample_magnitude() for _ in range(2000)])
    assert levels.max() == 10 and (levels == 10).float().mean() > 0.2  # clipped at the top of the scale
    assert {RandAugment(magnitude=7, magnitude_std=0).sample_magnitude() for _ in range(10)} == {7.0}
    # the 0-10 scale maps onto each op's range: m7 = 70 % of the maximum
    assert op_argument("Rotate", 7, False) == pytest.approx(21.0)
    assert op_argument("Rotate", 7, True) == pytest.approx(-21.0)
    assert op_argument("ShearX", 10, False) == pytest.approx(0.3)
    assert op_argument("ContrastIncreasing", 10, True) == pytest.approx(0.1)
    assert op_argument("PosterizeIncreasing", 10, False) == 0  # bits kept: the strongest posterize
    assert op_argument("Equalize", 7, True) is None
    with pytest.raises(GlitrError, match="magnitude"):
        RandAugment(magnitude=12)
    with pytest.raises(GlitrError, match="unknown RandAugment ops"):
        RandAugment(ops=["Cutout"])


@pytest.mark.parametrize("name", list(OPS))
def test_every_op_keeps_the_clip_uint8_and_treats_frames_alike(name):
    frame = _clip(1, 30, 40)
    clip = frame.repeat(3, 1, 1, 1)
    out = apply_op(clip, name, 9, negate=True)
    assert out.dtype == torch.uint8 and out.shape == clip.shape and out.is_contiguous()
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])
    assert torch.equal(out[:1], apply_op(frame, name, 9, negate=True))  # statistics are per frame
    if name not in ("AutoContrast", "Equalize", "Invert", "PosterizeIncreasing"):  # no magnitude, or 4 bits at 0
        assert torch.equal(apply_op(clip, name, 0), clip)  # magnitude 0 leaves the clip as it is


def test_randaugment_changes_clips_with_probability():
    clip = _clip(2)
    changed = 0
    for seed in range(20):
        torch.manual_seed(seed)
        changed += not torch.equal(RandAugment(num_ops=4, magnitude=7, magnitude_std=0.5)(clip), clip)
    assert 10 <= changed <= 20  # 4 ops at p=0.5: most clips change
    torch.manual_seed(0)
    assert torch.equal(RandAugment(num_ops=4, prob=0.0)(clip), clip)


def test_crop_resize_modes_agree_roughly_and_take_a_forced_box():
    clip = _clip(2, 48, 64)
    box = (4, 6, 30, 40)
    original = train_transform(24, randaug_n=0).crop(clip, box=box)
    antialiased = train_transform(24, randaug_n=0, crop_resize="antialiased").crop(clip, box=box)
    assert original.shape == antialiased.shape == (2, 3, 24, 24)
    ref = torch.nn.functional.interpolate(
        ((clip[..., 4:34, 6:46].float() / 255 - torch.tensor(IMAGENET_MEAN).view(3, 1, 1))
         / torch.tensor(IMAGENET_STD).view(3, 1, 1)),
        size=(24, 24), mode="bilinear", align_corners=False,
    )  # fmt: skip
    assert torch.allclose(original, ref, atol=1e-5)  # normalise, then resize the box bilinearly
    assert (original - antialiased).abs().mean() < 0.1
    with pytest.raises(GlitrError, match="crop_resize"):
        train_transform(24, crop_resize="nearest")


def test_eval_transform_is_resize_then_centre_crop_then_normalise():
    clip = _clip(3, 60, 80)
    out = eval_transform(32, 40)(clip)
    assert out.shape == (3, 3, 32, 32) and out.dtype == torch.float32
    ref = v2.functional.resize(clip, [40], v2.InterpolationMode.BICUBIC, antialias=True)  # (3, 3, 40, 53)
    ref = v2.functional.center_crop(ref, [32]).float() / 255
    ref = (ref - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.equal(out, eval_transform(32, 40)(clip))  # deterministic
    with pytest.raises(GlitrError, match="resize"):
        eval_transform(32, 16)


def test_normalisation_round_trip_and_no_flip():
    clip = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    clip[..., 16:] = 255  # dark left, bright right
    tf = train_transform(32, randaug_n=0, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    for seed in range(20):
        torch.manual_seed(seed)
        back = denormalize(tf(clip))
        assert torch.allclose(back, clip.float() / 255, atol=1e-5)  # never mirrored
    assert denormalize(torch.zeros(3, 4, 4))[:, 0, 0].tolist() == pytest.approx(list(IMAGENET_MEAN))
