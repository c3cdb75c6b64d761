"""The frame-folder dataset: TSN sampling, robust JPEG decoding, loader benchmark."""

from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import make_frames, write_jpeg
from PIL import Image
from torch.utils.data import DataLoader

from glitr_cli.data.dataset import JpegClip, VideoFolderDataset, build_dataset, decode_jpeg_bytes, decode_jpegs
from glitr_cli.data.sampling import FrameSampler
from glitr_cli.data.transforms import eval_transform
from glitr_cli.errors import GlitrError
from glitr_cli.recipe import DataConfig


def _make_dataset(root: Path, videos: dict[str, tuple[int, int]], split: str = "train", size=(24, 32)) -> Path:
    """A prepared dataset by hand: real JPEG frames, list file, category.txt."""
    for k, (vid, (n, _)) in enumerate(videos.items()):
        for i, f in enumerate(make_frames(n, *size, seed=k), start=1):
            write_jpeg(root / "frames" / vid / f"{i:06d}.jpg", f)
    (root / f"{split}_videofolder.txt").write_text("".join(f"{v} {n} {lab}\n" for v, (n, lab) in videos.items()))
    (root / "category.txt").write_text("a\nb\nc\n")
    return root


def _jpeg(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)


def test_whole_clip_sampling_covers_every_frame():
    whole = FrameSampler(4, "whole_clip")
    assert whole.indices(16, train=False) == [2, 6, 10, 14]  # centre of each segment
    assert whole.support(10) == [(0, 1), (2, 4), (5, 6), (7, 9)]
    assert whole.indices(10, train=False) == [1, 3, 6, 8]
    assert whole.indices(4, train=True) == [0, 1, 2, 3]
    g = torch.Generator().manual_seed(0)
    seen = [set() for _ in range(4)]
    for _ in range(300):
        for k, i in enumerate(whole.indices(10, train=True, generator=g)):
            seen[k].add(i)
    assert seen == [{0, 1}, {2, 3, 4}, {5, 6}, {7, 9, 8}]  # one random frame per segment, all reachable


def test_original_sampling_never_trains_on_the_last_frames():
    original = FrameSampler(4)
    assert original.support(10) == [(0, 1), (2, 3), (4, 5), (6, 7)]  # frames 8 and 9 are left out
    assert original.indices(10, train=False) == [1, 3, 6, 8]  # int(1.25 + 2.5 k)
    g = torch.Generator().manual_seed(0)
    drawn = {tuple(original.indices(10, train=True, generator=g)) for _ in range(200)}
    assert all(lo <= i <= hi for idx in drawn for i, (lo, hi) in zip(idx, original.support(10), strict=True))
    assert len(drawn) == 16  # every combination is reachable
    for sampler in (FrameSampler(5), FrameSampler(5, "whole_clip")):  # short clips: every frame, the last repeated
        assert sampler.indices(3, train=True) == [0, 1, 2, 2, 2]
    assert FrameSampler(5).indices(3, train=False) == [0, 0, 1, 2, 2]  # evaluation keeps the tick formula


def test_training_lists_drop_clips_too_short_for_the_original_sampling(tmp_path):
    root = _make_dataset(tmp_path / "ds", {"one": (1, 0), "two": (2, 1), "three": (3, 2), "nine": (9, 0)})
    train = VideoFolderDataset(root, "train", num_frames=4, train=True, min_frames=3)
    assert [r.id for r in train.records] == ["three", "nine"] and train.dropped_clips == 2
    evaluation = VideoFolderDataset(root, "train", num_frames=4)
    assert len(evaluation) == 4 and evaluation.dropped_clips == 0
    with pytest.raises(GlitrError, match="no videos with at least 10 frames"):
        VideoFolderDataset(root, "train", num_frames=4, min_frames=10)


def test_dataset_returns_normalised_clips_of_the_sampled_frames(tmp_path):
    root = _make_dataset(tmp_path / "ds", {"v1": (16, 2), "v2": (5, 0)})
    ds = VideoFolderDataset(root, "train", num_frames=4, transform=None, train=False)
    assert ds.class_names == ["a", "b", "c"] and ds.num_classes == 3 and len(ds) == 2
    clip, label = ds[0]
    assert clip.dtype == torch.uint8 and clip.shape == (4, 3, 24, 32) and label == 2
    for t, i in enumerate([2, 6, 10, 14]):
        assert torch.equal(clip[t], _jpeg(root / "frames" / "v1" / f"{i + 1:06d}.jpg"))
    short, _ = ds[1]
    assert torch.equal(short[3], _jpeg(root / "frames" / "v2" / "000005.jpg"))  # segments [0,1) [1,2) [2,3) [3,5)
    norm = VideoFolderDataset(root, "train", num_frames=8, transform=eval_transform(16, 20), train=True)
    x, _ = norm[1]
    assert x.shape == (8, 3, 16, 16) and x.dtype == torch.float32 and -2.5 < x.min() < x.max() < 2.7
    assert torch.equal(x[-1], x[-2])  # short video: its last frame repeated
    batch, labels = next(iter(DataLoader(norm, batch_size=2)))
    assert batch.shape == (2, 8, 3, 16, 16) and labels.tolist() == [2, 0]  # (B, T, 3, H, W)


def test_jpeg_decoders_agree(tmp_path):
    """torchvision's decoder (libjpeg-turbo, one file or a batch) gives Pillow's pixels exactly."""
    for k, frame in enumerate(make_frames(3, 40, 56)):
        write_jpeg(tmp_path / f"{k}.jpg", frame)
    files = [(tmp_path / f"{k}.jpg").read_bytes() for k in range(3)]
    batch = decode_jpegs([torch.frombuffer(bytearray(f), dtype=torch.uint8) for f in files], torch.device("cpu"))
    for data, decoded in zip(files, batch, strict=True):
        assert torch.equal(decode_jpeg_bytes(data, "torchvision"), decode_jpeg_bytes(data, "pillow"))
        assert torch.equal(decoded, decode_jpeg_bytes(data, "pillow"))


def test_decoding_in_the_training_process_reads_as_the_loader(tmp_path):
    """`encoded` items (the JPEG files) decoded by `decode` in one batched call give the loader's uint8
    clips exactly, bad files included: each replaced by its nearest readable frame and counted the same."""
    root = _make_dataset(tmp_path / "ds", {f"v{i}": (8, i % 3) for i in range(5)})
    frames = root / "frames"
    (frames / "v1/000003.jpg").write_bytes(b"\xff\xd8\xff\xe0 garbage, not a JPEG")  # corrupt
    (frames / "v2/000006.jpg").unlink()  # missing
    data = (frames / "v3/000004.jpg").read_bytes()
    (frames / "v3/000004.jpg").write_bytes(data[: len(data) // 2])  # truncated
    for p in (frames / "v4").iterdir():  # no readable frame: a black clip
        p.write_bytes(b"")
    loader = VideoFolderDataset(root, "train", num_frames=8, train=False)
    device = VideoFolderDataset(root, "train", num_frames=8, train=False, encoded=True)
    items = [device[i][0] for i in range(5)]
    assert isinstance(items[0], JpegClip) and items[0].indices == list(range(8)) and items[2].sizes[5] == 0
    cpu = torch.device("cpu")
    assert torch.equal(device.decode(items[:1], cpu)[0], loader[0][0])  # all files good: one batched call
    for i, clip in enumerate(device.decode(items, cpu)):  # a bad file: clip by clip, the bad clips as the loader
        assert torch.equal(clip, loader[i][0]), i
    assert torch.equal(device.damage, loader.damage)
    assert device.damage[:, 0].tolist() == [0, 1, 1, 1, 8] and int(device.damage[:, 1].sum()) == 1


def test_corrupt_and_missing_frames_are_replaced_by_neighbours_and_counted(tmp_path):
    root = _make_dataset(tmp_path / "ds", {"v": (8, 1)})
    frames = root / "frames" / "v"
    good = {i: _jpeg(frames / f"{i + 1:06d}.jpg") for i in range(8)}
    (frames / "000003.jpg").write_bytes(b"\xff\xd8\xff\xe0 garbage, not a JPEG")  # corrupt
    (frames / "000006.jpg").unlink()  # missing
    data = (frames / "000008.jpg").read_bytes()
    (frames / "000008.jpg").write_bytes(data[: len(data) // 2])  # truncated
    ds = VideoFolderDataset(root, "train", num_frames=8, transform=None, train=False)
    clip, _ = ds[0]
    expect = [0, 1, 1, 3, 4, 4, 6, 6]  # nearest readable neighbour, the earlier one on a tie
    for t, i in enumerate(expect):
        assert torch.equal(clip[t], good[i]), t
    assert int(ds.damage[:, 0].sum()) == 3 and int(ds.damage[:, 1].sum()) == 0
    # counted across DataLoader worker processes too, and never a crash mid-epoch
    (root / "train_videofolder.txt").write_text("v 8 1\n" * 6)
    ds = VideoFolderDataset(root, "train", num_frames=8, transform=None, train=False)
    n = sum(len(b) for b, _ in DataLoader(ds, batch_size=2, num_workers=2))
    assert n == 6 and int(ds.damage[:, 0].sum()) == 18
    # a video with no readable frame at all: a black clip, counted
    for p in frames.iterdir():
        p.write_bytes(b"")
    ds = VideoFolderDataset(root, "train", num_frames=4)
    clip, _ = ds[0]
    assert clip.shape[:2] == (4, 3) and clip.max() == 0 and int(ds.damage[:, 1].sum()) == 1


def test_unprepared_dataset_names_the_command(tmp_path):
    with pytest.raises(
        GlitrError,
        match=r"is not a prepared dataset \(missing train_videofolder.txt\): run `glitr prepare-data toy --out",
    ):
        VideoFolderDataset(tmp_path / "toy", "train", 8)
    (tmp_path / "mine").mkdir()
    with pytest.raises(GlitrError, match=r"run `glitr prepare-data folder --src DIR --out .*mine`"):  # your clips
        VideoFolderDataset(tmp_path / "mine", "val", 8)
    root = _make_dataset(tmp_path / "ds", {"v": (4, 5)})
    with pytest.raises(GlitrError, match=r"train_videofolder.txt:1: label 5 of video 'v' is outside 0..2"):
        VideoFolderDataset(root, "train", 8)
    # a recipe's dataset that is not there: the prepared ones beside it, the closest first
    with pytest.raises(GlitrError) as typo:
        build_dataset(DataConfig(root=str(tmp_path / "dss")), "train", train=True)
    assert str(typo.value) == (
        f"no dataset at {tmp_path / 'dss'} (data.dataset, data.root); did you mean {root}? prepared in {tmp_path}: "
        f"ds; prepare one: glitr prepare-data folder --src DIR --out {tmp_path / 'dss'}"
    )
    with pytest.raises(GlitrError, match="split must be one of"):
        VideoFolderDataset(root, "training", 8)
