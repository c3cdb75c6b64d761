"""`glitr prepare-data folder` on your own clips: class folders (with or without split folders) and a
CSV, built from real videos (H.264 MP4, VP9 WebM, MPEG-4 AVI), a real JPEG frame folder, a truncated
file and a file that is not a video."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from data_helpers import encode_video, make_frames, truncate, write_jpeg
from PIL import Image

from glitr_cli.data.dataset import VideoFolderDataset
from glitr_cli.data.folder import Clip, assign_splits, clip_id, prepare_folder, scan_class_folders
from glitr_cli.errors import GlitrError


def make_class_folders(root: Path) -> dict[str, int]:
    """cat/ and dog/ clips of 48x64 frames; returns the frame count of every clip that decodes."""
    encode_video(root / "cat" / "a.mp4", make_frames(10, 48, 64, seed=1), "h264")
    encode_video(root / "cat" / "b.webm", make_frames(8, 48, 64, seed=2), "vp9")
    for i, frame in enumerate(make_frames(6, 48, 64, seed=3), start=1):
        write_jpeg(root / "cat" / "c frames" / f"img{i}.jpg", frame)  # natural order: img2 before img10
    encode_video(root / "dog" / "d.avi", make_frames(9, 48, 64, seed=4), "mpeg4")
    encode_video(root / "dog" / "e.webm", make_frames(24, 48, 64, seed=5), "vp9")
    truncate(root / "dog" / "e.webm", 0.6)
    (root / "dog" / "f.mp4").write_bytes(b"this is not a video at all\n" * 50)
    encode_video(root / "dog" / "g.webm", make_frames(7, 48, 64, seed=6), "vp9")
    (root / "dog" / "notes.txt").write_text("not a clip\n")
    (root / "dog" / ".DS_Store").write_bytes(b"\0")
    return {"cat__a.mp4": 10, "cat__b.webm": 8, clip_id("cat/c frames"): 6, "dog__d.avi": 9, "dog__g.webm": 7}


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    root = tmp_path_factory.mktemp("clips") / "mine"
    return root, make_class_folders(root)


def _lists(out: Path) -> dict[str, str]:
    return {s: (out / f"{s}_videofolder.txt").read_text() for s in ("train", "val", "test")}


def test_class_folders_several_codecs_a_frame_folder_and_failures(clips, tmp_path, glitr, monkeypatch):
    src, frames = clips
    monkeypatch.setenv("GLITR_DATA", str(tmp_path / "data"))
    code, out_text, err = glitr(
        "prepare-data", "folder", "--src", src, "--val-fraction", "0.5", "--short-side", "32", "-j", "2"
    )
    out = tmp_path / "data" / "mine"  # the default: <data root>/<name of --src>
    assert code == 1, out_text + err  # two clips failed
    assert "5 done, 0 skipped (already prepared), 2 failed" in out_text
    assert (out / "category.txt").read_text() == "cat\ndog\n"
    c = clip_id("cat/c frames")
    assert c.startswith("cat__c_frames-") and len(c) == len("cat__c_frames-") + 8
    # stratified, seeded: half of each class's clips (cat 3 -> 2, dog 4 -> 2) set aside for validation
    assert _lists(out) == {
        "train": "cat__a.mp4 10 0\ndog__g.webm 7 1\n",
        "val": f"cat__b.webm 8 0\n{c} 6 0\ndog__d.avi 9 1\n",
        "test": "",
    }
    failed = dict(line.split("\t", 1) for line in (out / "failed.txt").read_text().splitlines())
    assert list(failed) == ["dog__e.webm", "dog__f.mp4"]  # e drawn for train, f for val: both left out
    assert "truncated" in failed["dog__e.webm"] and "e.webm" in failed["dog__e.webm"]
    assert "cannot open as a video" in failed["dog__f.mp4"]
    assert sorted(p.name for p in (out / "frames").iterdir()) == sorted(frames)
    for vid, n in frames.items():
        names = sorted(p.name for p in (out / "frames" / vid).iterdir())
        assert names == [f"{i:06d}.jpg" for i in range(1, n + 1)]
        with Image.open(out / "frames" / vid / "000001.jpg") as im:
            assert im.size == (43, 32)  # short side 32
    sources = [line.split("\t") for line in (out / "sources.txt").read_text().splitlines()]
    assert [s[2] for s in sources if s[1] == "val"] == ["cat/b.webm", "cat/c frames", "dog/d.avi", "dog/f.mp4"]
    # the frame folder keeps its images' natural order: frame 2 is img2.jpg, not img10
    dataset = VideoFolderDataset(out, "train", num_frames=3)
    assert dataset.class_names == ["cat", "dog"] and len(dataset) == 2

    # a rerun skips what is done and redoes only the failures
    code, out_text, _ = glitr("prepare-data", "folder", "--src", src, "--val-fraction", "0.5", "--short-side", "32")
    assert code == 1 and "0 done, 5 skipped (already prepared), 2 failed" in out_text
    assert _lists(out)["val"] == f"cat__b.webm 8 0\n{c} 6 0\ndog__d.avi 9 1\n"


def test_validation_draw_is_seeded_stratified_and_stable(clips):
    src, _ = clips
    found = scan_class_folders(src)
    assert [c.rel for c in found] == ["cat/a.mp4", "cat/b.webm", "cat/c frames"] + [
        f"dog/{n}" for n in ("d.avi", "e.webm", "f.mp4", "g.webm")
    ]

    def val(seed: int, fraction: float = 0.5, clips=found) -> list[str]:
        return [c.rel for c in assign_splits(clips, fraction, seed)["val"]]

    assert val(0) == val(0)
    assert any(val(s) != val(0) for s in range(1, 6))
    for seed in range(6):
        v = val(seed, 0.2)
        assert sum(r.startswith("cat/") for r in v) == 1 and sum(r.startswith("dog/") for r in v) == 1
    # a new class leaves the other classes' draw alone
    more = [*found, *[Clip(Path("x"), f"eel/{i}.mp4", "eel", None) for i in range(3)]]
    assert [r for r in val(3, clips=more) if not r.startswith("eel/")] == val(3)


def test_split_folders(tmp_path, glitr):
    src, out = tmp_path / "clips", tmp_path / "out"
    encode_video(src / "train" / "run" / "1.mp4", make_frames(5, 32, 40, seed=1), "h264")
    encode_video(src / "train" / "run" / "2.webm", make_frames(6, 32, 40, seed=2), "vp9")
    encode_video(src / "train" / "walk" / "3.avi", make_frames(7, 32, 40, seed=3), "mpeg4")
    encode_video(src / "val" / "walk" / "4.webm", make_frames(4, 32, 40, seed=4), "vp9")
    for i, frame in enumerate(make_frames(3, 32, 40, seed=5), start=1):
        write_jpeg(src / "test" / "run" / "5" / f"{i:05d}.jpg", frame)
    code, out_text, err = glitr("prepare-data", "folder", "--src", src, "--out", out, "--short-side", "0")
    assert code == 0, out_text + err
    assert (out / "category.txt").read_text() == "run\nwalk\n"
    assert _lists(out) == {
        "train": "train__run__1.mp4 5 0\ntrain__run__2.webm 6 0\ntrain__walk__3.avi 7 1\n",
        "val": "val__walk__4.webm 4 1\n",  # given, so nothing is drawn from train
        "test": "test__run__5 3 0\n",
    }
    assert not (out / "failed.txt").exists()
    with Image.open(out / "frames" / "test__run__5" / "000001.jpg") as im:
        assert im.size == (40, 32)  # --short-side 0 keeps the size

    shutil.move(src / "val", src / "valid")
    code, _, err = glitr("prepare-data", "folder", "--src", src, "--out", out)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "unknown split name 'valid'" in err and str(src / "valid") in err.replace("\n", "")


def test_a_class_without_videos_and_stray_files_are_one_line_errors(tmp_path, glitr):
    src = tmp_path / "clips"
    encode_video(src / "cat" / "a.webm", make_frames(4, 32, 32), "vp9")
    (src / "dog").mkdir()
    (src / "dog" / "readme.txt").write_text("no clips here\n")
    code, _, err = glitr("prepare-data", "folder", "--src", src, "--out", tmp_path / "out")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"{src / 'dog'}: class 'dog' has no videos" in err.replace("\n", "")
    shutil.rmtree(src / "dog")
    write_jpeg(src / "cat" / "000001.jpg", make_frames(1, 32, 32)[0])
    with pytest.raises(GlitrError, match="an image directly in the class folder"):
        scan_class_folders(src)
    code, _, err = glitr("prepare-data", "folder", "--out", tmp_path / "out")
    assert code == 2 and "Missing option '--src'" in err


def test_every_class_with_one_clip_leaves_no_validation_clips(tmp_path):
    src = tmp_path / "clips"
    for name in ("a", "b"):
        encode_video(src / name / "1.webm", make_frames(3, 32, 32), "vp9")
    with pytest.raises(GlitrError, match="no val clips; every class has a single clip"):
        prepare_folder(src, tmp_path / "out", workers=1, progress=False)


def make_csv_clips(src: Path) -> None:
    encode_video(src / "videos" / "one.mp4", make_frames(5, 32, 40, seed=1), "h264")
    encode_video(src / "videos" / "two.webm", make_frames(6, 32, 40, seed=2), "vp9")
    encode_video(src / "videos" / "three.avi", make_frames(4, 32, 40, seed=3), "mpeg4")
    encode_video(src / "more" / "four.webm", make_frames(3, 32, 40, seed=4), "vp9")


def test_csv_with_splits_and_integer_labels(tmp_path, glitr):
    src, out = tmp_path / "clips", tmp_path / "out"
    make_csv_clips(src)
    for i, frame in enumerate(make_frames(5, 32, 40, seed=7), start=1):
        write_jpeg(src / "frames" / "five" / f"{i:04d}.jpg", frame)
    encode_video(src / "videos" / "six.webm", make_frames(24, 32, 40, seed=8), "vp9")
    truncate(src / "videos" / "six.webm", 0.5)
    (src / "videos" / "seven.avi").write_bytes(b"RIFF, but not a video\n" * 40)
    listing = tmp_path / "labels.csv"
    listing.write_text(
        "path,label,split\nvideos/one.mp4,1,train\nvideos/two.webm,0,train\n\nmore/four.webm,1,val\n"
        "videos/three.avi,0,test\nframes/five,1,train\nvideos/six.webm,0,val\nvideos/seven.avi,1,train\n"
    )
    code, out_text, err = glitr("prepare-data", "folder", "--src", src, "--csv", listing, "--out", out, "-j", "2")
    assert code == 1, out_text + err
    assert "5 done, 0 skipped (already prepared), 2 failed" in out_text
    assert (out / "category.txt").read_text() == "0\n1\n"  # integer labels are the class indices
    assert _lists(out) == {
        "train": "videos__one.mp4 5 1\nvideos__two.webm 6 0\nframes__five 5 1\n",  # the CSV's order
        "val": "more__four.webm 3 1\n",
        "test": "videos__three.avi 4 0\n",
    }
    failed = dict(line.split("\t", 1) for line in (out / "failed.txt").read_text().splitlines())
    assert list(failed) == ["videos__seven.avi", "videos__six.webm"]  # train, then val
    assert "cannot open as a video" in failed["videos__seven.avi"]
    assert "truncated" in failed["videos__six.webm"]


def test_csv_without_splits_and_named_classes(tmp_path, glitr):
    src, out = tmp_path / "clips", tmp_path / "out"
    make_csv_clips(src)
    listing = src / "labels.csv"
    listing.write_text("videos/one.mp4,zebra\n./videos/two.webm,ant\nvideos/three.avi,zebra\nmore/four.webm,ant\n")
    code, out_text, err = glitr("prepare-data", "folder", "--src", src, "--csv", listing, "--out", out)
    assert code == 0, out_text + err
    assert (out / "category.txt").read_text() == "ant\nzebra\n"
    lists = _lists(out)
    assert len(lists["val"].splitlines()) == 2 and len(lists["train"].splitlines()) == 2  # one of each class
    assert {line.split()[2] for line in lists["val"].splitlines()} == {"0", "1"}


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ("videos/one.mp4,a\nvideos/gone.mp4,b\n", "labels.csv:2: {src}/videos/gone.mp4 not found"),
        ("path,label\nvideos/one.mp4,a\nvideos/two.webm,b\n./videos/one.mp4,b\n", "labels.csv:4: ./videos/one.mp4 is "
         "already listed on line 2"),
        ("videos/one.mp4,a,train\nvideos/two.webm,b,validation\n", "labels.csv:2: unknown split name 'validation'"),
        ("videos/one.mp4,0\nvideos/two.webm,2\n", "labels.csv: class 1 has no videos"),
        ("videos/one.mp4\n", "labels.csv:1: expected path,label[,split]"),
    ],
)  # fmt: skip
def test_csv_mistakes_are_one_line_errors_naming_file_and_line(tmp_path, glitr, rows, message):
    src = tmp_path / "clips"
    make_csv_clips(src)
    listing = tmp_path / "labels.csv"
    listing.write_text(rows)
    code, _, err = glitr("prepare-data", "folder", "--src", src, "--csv", listing, "--out", tmp_path / "out")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert message.format(src=src) in err.replace("\n", "")
    assert not (tmp_path / "out" / "frames").exists()  # nothing decoded before the listing is checked


def test_options_of_other_datasets_are_refused(tmp_path, glitr):
    code, _, err = glitr("prepare-data", "folder", "--src", tmp_path, "--toy-train", "3")
    assert code == 2 and "No such option: --toy-train" in err
    code, _, err = glitr("prepare-data", "toy", "--out", tmp_path / "t", "--csv", tmp_path / "x.csv")
    assert code == 2 and "No such option: --csv" in err and "prepare-data toy --help" in err
    code, _, err = glitr("prepare-data", "folder", "--src", tmp_path, "--val-fraction", "1")
    assert code == 2 and "--val-fraction must lie strictly between 0 and 1" in err


def test_clip_ids_are_unique_stable_and_need_no_quoting():
    assert clip_id("walk/clip1.mp4") == "walk__clip1.mp4"
    assert clip_id("train/walk/clip1.mp4") == "train__walk__clip1.mp4"
    paths = ["a/b.mp4", "a__b.mp4", "a b.mp4", "a_b.mp4", ".a/b.mp4", "_a/b.mp4", "é/b.mp4", "e/b.mp4"]
    ids = [clip_id(p) for p in paths]
    assert len(set(ids)) == len(ids)
    assert all(not i.startswith(".") and all(ch.isascii() and not ch.isspace() and ch != "/" for ch in i) for i in ids)
    assert ids == [clip_id(p) for p in paths]  # a function of the path alone
