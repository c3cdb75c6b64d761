"""Clip transforms: one set of random parameters per clip, honest magnitude noise, no flip."""

import pytest
import torch
from data_helpers import make_frames
from torchvision.transforms import v2

from glitr_cli.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ClipRandAugment,
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
    ra = ClipRandAugment(num_ops=4, magnitude=7, magnitude_std=0.5)
    levels = torch.tensor([ra.sample_level() for _ in range(4000)])
    assert abs(levels.mean() - 7) < 0.05 and abs(levels.std() - 0.5) < 0.03
    high = ClipRandAugment(magnitude=9.8, magnitude_std=0.5)
    levels = torch.tensor([high.sample_level() for _ in range(2000)])
    assert levels.max() == 10 and (levels == 10).float().mean() > 0.2  # clipped at the top of the scale
    assert {ClipRandAugment(magnitude=7, magnitude_std=0).sample_level() for _ in range(10)} == {7.0}
    # the 0-10 scale maps onto each op's range: m7 = 70 % of the maximum
    assert ra.op_magnitude("Rotate", 7, 100, 100) == pytest.approx(21.0)
    assert ra.op_magnitude("ShearX", 10, 100, 100) == pytest.approx(0.3)
    assert ra.op_magnitude("TranslateX", 5, 100, 331) == pytest.approx(75.0)
    assert ra.op_magnitude("Posterize", 10, 100, 100) == 4  # bits kept
    with pytest.raises(GlitrError, match="magnitude"):
        ClipRandAugment(magnitude=12)


def test_randaugment_changes_clips_with_probability():
    clip = _clip(2)
    changed = 0
    for seed in range(20):
        torch.manual_seed(seed)
        changed += not torch.equal(ClipRandAugment(num_ops=4, magnitude=7, magnitude_std=0.5)(clip), clip)
    assert 10 <= changed <= 20  # 4 ops at p=0.5 (some ops are identity): most clips change
    torch.manual_seed(0)
    assert torch.equal(ClipRandAugment(num_ops=4, prob=0.0)(clip), clip)


def test_eval_transform_is_resize_then_centre_crop_then_normalise():
    clip = _clip(3, 60, 80)
    out = eval_transform(32, 40)(clip)
    assert out.shape == (3, 3, 32, 32) and out.dtype == torch.float32
    ref = v2.functional.resize(clip, [40], antialias=True)  # (3, 3, 40, 53)
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
    names = {type(t).__name__ for t in tf.transforms}
    assert not names & {"RandomHorizontalFlip", "RandomVerticalFlip"}
    for seed in range(20):
        torch.manual_seed(seed)
        back = denormalize(tf(clip))
        assert torch.allclose(back, clip.float() / 255, atol=1e-5)  # never mirrored
    assert denormalize(torch.zeros(3, 4, 4))[:, 0, 0].tolist() == pytest.approx(list(IMAGENET_MEAN))
