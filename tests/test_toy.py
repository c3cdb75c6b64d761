"""The toy dataset: where to look decides the class, and it takes the SSv2 path."""

import json
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
from data_helpers import tree_bytes
from PIL import Image

from glitr_cli.data.dataset import VideoFolderDataset
from glitr_cli.data.toy import (
    DIRECTIONS,
    SHAPES,
    ToyConfig,
    ToyVideo,
    clip_rng,
    generate_toy,
    make_clip,
    plan_videos,
    read_toy_config,
    render_clip,
    sample_clip,
    target_in_glimpse,
    target_revealed,
)
from glitr_cli.data.video import iter_video_frames
from glitr_cli.errors import GlitrError


@pytest.mark.parametrize("size, frames", [(112, 16), (96, 24)])
def test_a_centre_glimpse_never_sees_the_shape(size, frames):
    """Clips that differ only in the target's shape are pixel-identical inside the central
    region (the centred 3/7-of-the-side glimpse: 48 px of 112) in every frame. So whatever
    a fixed centre glimpse computes has the same distribution for every class sharing a
    direction: it can at best split those classes by chance, and no class is solvable
    from it. The shape differs only outside the centre, where the target goes."""
    cfg = ToyConfig(size=size, num_frames=frames, shapes=SHAPES)
    lo = (size - cfg.centre_side) // 2
    hi = lo + cfg.centre_side
    assert (size, cfg.centre_side) != (112, 48) or (lo, hi) == (32, 80)
    for k in range(12):
        direction = tuple(DIRECTIONS)[k % 4]
        video = ToyVideo(str(k), "train", k, 0)
        clips = {s: sample_clip(clip_rng(cfg, video), cfg, s, direction) for s in SHAPES}
        renders = {s: render_clip(c, cfg) for s, c in clips.items()}
        ref = renders[SHAPES[0]]
        for s in SHAPES[1:]:
            other = renders[s]
            assert np.array_equal(ref[:, lo:hi, lo:hi], other[:, lo:hi, lo:hi])  # centre: identical
            diff = np.any(ref != other, axis=-1)  # (T, H, W): where the shapes show
            assert diff.any()
            assert not diff[:, lo:hi, lo:hi].any()
        clip = clips[SHAPES[0]]
        revealed = target_revealed(clip, cfg)
        c = size / 2
        assert np.abs(clip.path[0] - c).max() + 0.6 * clip.radius < cfg.centre_side / 2  # starts as a dot in the centre
        assert revealed.mean() >= 0.6 and revealed[-1]  # the shape shows for most of the clip, outside the centre
        assert (clip.path - clip.radius >= 0).all() and (clip.path + clip.radius <= size).all()  # stays in the frame
        # the target moves in its class direction
        move = clip.path[-1] - clip.path[0]
        assert np.dot(move, DIRECTIONS[direction]) > 0.25 * size


@pytest.mark.parametrize("resize, crop", [(None, None), (128, 112), (96, 96)])
def test_target_in_glimpse_matches_the_drawn_pixels(resize, crop):
    """A glimpse said to hold the whole target holds the centre of every pixel the target paints;
    one shifted a pixel and a half further does not. Checked on rendered clips, frames
    mapped like evaluation maps them (resize, centre crop)."""
    cfg = ToyConfig(shapes=("square", "ring"))
    size = resize or cfg.size
    side = crop or size
    half = (side - 1) / 2
    zoom = size / cfg.size
    scale = 4 / 7
    for k, direction in enumerate(DIRECTIONS):
        video = ToyVideo(str(k), "validation", k, 0)
        clip = sample_clip(clip_rng(cfg, video), cfg, ("square", "ring")[k % 2], direction)
        indices = np.flatnonzero(target_revealed(clip, cfg))[::2].tolist()  # the shape, not the smaller dot
        painted = np.any(render_clip(clip, cfg) != render_clip(replace(clip, colour=(0, 0, 0)), cfg), axis=-1)
        centre = (clip.path[indices] * zoom - (size - side) / 2 - 0.5 - half) / half
        reach = scale - 0.85 * clip.radius * zoom / half
        right, down = np.array([1.0, 0.0]), np.array([0.0, 1.0])
        for locs, whole in [
            (centre, True),
            (centre + (reach - 1 / half) * right, True),
            (centre - (reach - 1 / half) * down, True),
            (centre + (reach + 1.5 / half) * right, False),
            (centre - (reach + 1.5 / half) * down, False),
        ]:
            inside = target_in_glimpse(clip, cfg, indices, locs, scale, resize=resize, crop=crop)
            assert inside.tolist() == [whole] * len(indices)
            for t, loc in zip(indices, locs, strict=True):
                # the glimpse spans [l - s, l + s]: that box in source-frame pixels
                lo, hi = (((loc + d) * half + half + 0.5 + (size - side) / 2) / zoom for d in (-scale, scale))
                ys, xs = np.nonzero(painted[t])
                held = (xs + 0.5 >= lo[0]) & (xs + 0.5 <= hi[0]) & (ys + 0.5 >= lo[1]) & (ys + 0.5 <= hi[1])
                assert held.all() == whole


def test_toy_download_is_deterministic_and_resumable(tmp_path):
    cfg = ToyConfig(seed=3, num_train=5, num_val=3, num_test=1, num_frames=8)
    a, b = tmp_path / "a", tmp_path / "b"
    assert generate_toy(a, cfg, workers=1, progress=False) == 9
    assert generate_toy(b, cfg, workers=2, progress=False) == 9
    assert tree_bytes(a) == tree_bytes(b)  # same seed: same JSON and same video bytes
    (b / "20bn-something-something-v2" / "4.webm").unlink()
    assert generate_toy(b, cfg, workers=1, progress=False) == 1  # only the missing video is redone
    assert tree_bytes(a) == tree_bytes(b)
    other = generate_toy(tmp_path / "c", ToyConfig(seed=4, num_train=5, num_val=3, num_test=1, num_frames=8), 1, False)
    assert other == 9 and tree_bytes(tmp_path / "c") != tree_bytes(a)
    assert read_toy_config(a) == cfg
    (b / "toy.json").write_text('{"generator": 0}')
    with pytest.raises(GlitrError, match="not a toy download of generator version"):
        read_toy_config(b)
    with pytest.raises(GlitrError, match=r"made with other settings \(--toy-frames 8 there, 9 now\)"):
        generate_toy(a, ToyConfig(seed=3, num_train=5, num_val=3, num_test=1, num_frames=9), 1, False)
    with pytest.raises(GlitrError, match="--toy-shapes"):
        ToyConfig.from_options(shapes="square,hexagon")


def test_prepare_data_toy_takes_the_ssv2_path(tmp_path, glitr):
    out = tmp_path / "toy"
    code, out_text, err = glitr("prepare-data", "toy", "--out", out, "--toy-train", "16", "--toy-val", "8",
                                "--toy-test", "2", "--workers", "2")  # fmt: skip
    assert code == 0, err
    assert "26 done, 0 skipped (already prepared), 0 failed" in out_text
    dl = out / "download"
    for key in ("labels", "train", "validation", "test"):
        assert (dl / f"something-something-v2-{key}.json").is_file()
    cfg = ToyConfig(num_train=16, num_val=8, num_test=2)
    labels = json.loads((dl / "something-something-v2-labels.json").read_text())
    assert list(labels) == cfg.class_names == (out / "category.txt").read_text().splitlines()
    assert len(cfg.class_names) == 8 and cfg.class_names[0] == "Square moving left"
    train = [line.split() for line in (out / "train_videofolder.txt").read_text().splitlines()]
    assert len(train) == 16 and all(n == "16" for _, n, _ in train)
    assert Counter(int(lab) for _, _, lab in train) == {c: 2 for c in range(8)}  # balanced
    assert len((out / "val_videofolder.txt").read_text().splitlines()) == 8
    assert (out / "test_videofolder.txt").read_text() == "25 16\n26 16\n"
    with Image.open(out / "frames" / "1" / "000001.jpg") as im:
        assert im.size == (112, 112)  # native size, no resize to 256
    # frames hold the rendered clip (through VP9 and JPEG)
    videos = plan_videos(cfg)
    rendered = make_clip(cfg, videos[0]).astype(float)
    jpg = np.stack([np.asarray(Image.open(out / "frames" / "1" / f"{i:06d}.jpg")) for i in range(1, 17)]).astype(float)
    assert 10 * np.log10(255**2 / ((jpg - rendered) ** 2).mean()) > 28
    assert len(list(iter_video_frames(dl / "20bn-something-something-v2" / "1.webm"))) == 16
    ds = VideoFolderDataset(out, "val", num_frames=8)
    clip, label = ds[0]
    assert clip.shape == (8, 3, 112, 112) and 0 <= label < 8 and ds.num_classes == 8
    # resuming a finished toy preparation does nothing
    code, out_text, _ = glitr(
        "prepare-data", "toy", "--out", out, "--toy-train", "16", "--toy-val", "8", "--toy-test", "2"
    )
    assert code == 0 and "0 done, 26 skipped" in out_text
