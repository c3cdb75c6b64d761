"""`glitr prepare-data ssv2|jester` on downloads in the official layouts, built from real
videos (VP9/VP8 WebM, H.264 MP4/MKV, MPEG-4 AVI) and real JPEG folders."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from data_helpers import (
    JESTER_LABELS,
    SSV2_CLASSES,
    encode_video,
    make_frames,
    make_jester_download,
    make_ssv2_download,
    tree_bytes,
    truncate,
)
from PIL import Image

from glitr_cli.data.dataset import VideoFolderDataset
from glitr_cli.data.prepare import prepare_jester, prepare_ssv2
from glitr_cli.data.video import iter_video_frames
from glitr_cli.errors import GlitrError
from glitr_cli.paths import data_root


def _frame_sizes(folder: Path) -> set[tuple[int, int]]:
    sizes = set()
    for p in folder.iterdir():
        with Image.open(p) as im:
            sizes.add(im.size)  # (width, height)
    return sizes


def test_ssv2_official_layout_several_codecs(tmp_path, glitr):
    src, out = tmp_path / "download", tmp_path / "ssv2"
    make_ssv2_download(src, [
        ("101", "train", 2, "vp9", (48, 64), 10),
        ("102", "train", 0, "h264", (64, 48), 9),  # portrait H.264 in MP4, named .webm
        ("103", "validation", 1, "mpeg4", (48, 64), 8),  # MPEG-4 in AVI, named .webm
        ("104", "validation", 0, "vp8", (48, 64), 7),
        ("105", "test", 0, "h264-mkv", (48, 64), 6),
    ])  # fmt: skip
    code, out_text, err = glitr("prepare-data", "ssv2", "--src", src, "--out", out, "--workers", "2")
    assert code == 0, err
    assert "5 done, 0 skipped (already prepared), 0 failed" in out_text
    assert (out / "category.txt").read_text().splitlines() == [SSV2_CLASSES[i] for i in range(3)]
    assert (out / "train_videofolder.txt").read_text() == "101 10 2\n102 9 0\n"
    assert (out / "val_videofolder.txt").read_text() == "103 8 1\n104 7 0\n"
    assert (out / "test_videofolder.txt").read_text() == "105 6\n"
    assert not (out / "failed.txt").exists()
    counts = {"101": 10, "102": 9, "103": 8, "104": 7, "105": 6}
    for vid, n in counts.items():
        names = sorted(p.name for p in (out / "frames" / vid).iterdir())
        assert names == [f"{i:06d}.jpg" for i in range(1, n + 1)]  # 1-based, 6 digits
        want = (256, 341) if vid == "102" else (341, 256)  # short side 256, aspect kept
        assert _frame_sizes(out / "frames" / vid) == {want}
    # the JPEGs hold the decoded video, resized
    ref = list(iter_video_frames(src / "20bn-something-something-v2" / "101.webm", short_side=256))
    jpg = np.asarray(Image.open(out / "frames" / "101" / "000004.jpg")).astype(float)
    assert np.abs(jpg - ref[3]).mean() < 3.0
    assert not any(p.name.startswith(".") for p in (out / "frames").iterdir())


def test_ssv2_newer_label_layout_with_videos_in_src(tmp_path):
    src, out = tmp_path / "dl", tmp_path / "out"
    make_ssv2_download(src, [("7", "train", 1, "vp9", (32, 48), 5), ("8", "validation", 2, "vp9", (32, 48), 6)],
                       layout="new", in_subdir=False)  # fmt: skip
    s = prepare_ssv2(src, out, workers=1, progress=False, short_side=0)  # 0: native size
    assert s.ok and s.done == 2 and s.listed == {"train": 1, "val": 1, "test": 0}
    assert (out / "train_videofolder.txt").read_text() == "7 5 1\n"
    assert (out / "val_videofolder.txt").read_text() == "8 6 2\n"
    assert _frame_sizes(out / "frames" / "7") == {(48, 32)}


def test_truncated_empty_and_undecodable_videos_go_to_failed_txt(tmp_path, glitr):
    src, out = tmp_path / "download", tmp_path / "ssv2"
    make_ssv2_download(src, [
        ("1", "train", 0, "vp9", (48, 64), 24),
        ("2", "train", 1, "vp9", (48, 64), 24),  # will be truncated
        ("3", "train", 2, "h264", (48, 64), 24),
        ("4", "validation", 0, "vp9", (48, 64), 12),  # will be emptied
        ("5", "validation", 1, "mpeg4", (48, 64), 24),  # will be truncated (AVI)
        ("6", "validation", 2, "vp9", (48, 64), 12),  # will be replaced by a non-video
        ("7", "test", 0, "vp9", (48, 64), 12),  # will be deleted
    ])  # fmt: skip
    vdir = src / "20bn-something-something-v2"
    truncate(vdir / "2.webm", 0.6)
    (vdir / "4.webm").write_bytes(b"")
    truncate(vdir / "5.webm", 0.6)
    (vdir / "6.webm").write_bytes(b"this is not a video at all\n" * 50)
    (vdir / "7.webm").unlink()
    code, out_text, err = glitr("prepare-data", "ssv2", "--src", src, "--out", out, "--workers", "2")
    assert code == 1, out_text + err
    assert "2 done, 0 skipped (already prepared), 5 failed" in out_text
    failed = dict(line.split("\t", 1) for line in (out / "failed.txt").read_text().splitlines())
    assert list(failed) == ["2", "4", "5", "6", "7"]
    assert "truncated" in failed["2"] and "2.webm" in failed["2"]
    assert "truncated" in failed["5"]
    assert "cannot open as a video" in failed["4"] and "4.webm" in failed["4"]
    assert "cannot open as a video" in failed["6"]
    assert "no video file 7.*" in failed["7"]
    assert (out / "train_videofolder.txt").read_text() == "1 24 0\n3 24 2\n"
    assert (out / "val_videofolder.txt").read_text() == ""
    assert (out / "test_videofolder.txt").read_text() == ""
    assert sorted(p.name for p in (out / "frames").iterdir()) == ["1", "3"]  # nothing half-written left


def test_killed_preparation_resumes_to_the_same_output(tmp_path, glitr):
    src = tmp_path / "download"
    make_ssv2_download(
        src, [(str(i), "train" if i < 10 else "validation", i % 3, "vp9", (96, 128), 24) for i in range(12)]
    )
    reference = tmp_path / "reference"
    assert prepare_ssv2(src, reference, workers=1, progress=False).ok

    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [
        sys.executable,
        "-m",
        "glitr_cli",
        "prepare-data",
        "ssv2",
        "--src",
        str(src),
        "--out",
        str(out),
        "--workers",
        "1",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    frames = out / "frames"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if frames.is_dir() and any(not p.name.startswith(".") for p in frames.iterdir()):
            break
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = [p for p in frames.iterdir() if not p.name.startswith(".")]
    assert 1 <= len(finished) < 12, "the run was not interrupted half-way"
    assert not (out / "train_videofolder.txt").exists()

    code, out_text, err = glitr("prepare-data", "ssv2", "--src", src, "--out", out, "--workers", "2")
    assert code == 0, err
    assert f"{12 - len(finished)} done, {len(finished)} skipped" in out_text
    assert tree_bytes(out) == tree_bytes(reference)  # lists, category, info and every JPEG byte


def test_missing_download_says_which_files_go_where(tmp_path, monkeypatch, glitr):
    monkeypatch.chdir(tmp_path)
    code, _, err = glitr("prepare-data", "ssv2")
    assert code == 2
    err = " ".join(err.split())
    assert "no Something-Something-V2 download in data/ssv2/download" in err
    assert "something-something-v2-{labels,train,validation,test}.json" in err
    assert "data/ssv2/download/20bn-something-something-v2/" in err
    code, _, err = glitr("prepare-data", "jester", "--data-root", "elsewhere")
    assert code == 2
    err = " ".join(err.split())
    assert (
        "no Jester download in elsewhere/jester/download" in err
        and "jester-v1-{labels,train,validation,test}.csv" in err
    )
    assert "elsewhere/jester/download/20bn-jester-v1/" in err
    # a malformed label file: one line naming file and line
    src = tmp_path / "dl"
    make_ssv2_download(src, [("1", "train", 0, "vp9", (32, 32), 4), ("2", "validation", 0, "vp9", (32, 32), 4)])
    (src / "something-something-v2-validation.json").write_text('[\n{"id": "2", "template": "Nope [x]"}\n]')
    code, _, err = glitr("prepare-data", "ssv2", "--src", src, "--out", tmp_path / "o")
    assert code == 2
    err = " ".join(err.split())
    assert "something-something-v2-validation.json:2: template" in err
    assert "(class 'Nope x') is not in the labels file" in err


def test_prepare_data_jester_typed_exactly_in_a_project(tmp_path, monkeypatch, glitr):
    project = tmp_path / "project"
    make_jester_download(project / "data" / "jester" / "download", [
        ("1", "train", "Swiping Left", 5),
        ("2", "train", "No gesture", 7),
        ("3", "train", "Doing other things", 4),
        ("4", "validation", "Zooming In With Two Fingers", 6),
        ("6", "test", None, 3),
    ])  # fmt: skip
    monkeypatch.chdir(project)
    code, _, err = glitr("prepare-data", "jester")  # as the README types it
    assert code == 0, err
    out = project / "data" / "jester"
    assert (out / "category.txt").read_text().splitlines() == sorted(JESTER_LABELS)
    assert (out / "train_videofolder.txt").read_text() == "1 5 2\n2 7 1\n3 4 0\n"
    assert (out / "val_videofolder.txt").read_text() == "4 6 3\n"
    assert (out / "test_videofolder.txt").read_text() == "6 3\n"
    assert not (out / "frames").exists()  # frames stay in the download
    info = json.loads((out / "glitr_dataset.json").read_text())
    assert info == {"name": "jester", "frames_dir": "download/20bn-jester-v1", "template": "%05d.jpg"}
    # the dataset the jester recipe reads (<data root>/jester) loads from the official frames
    ds = VideoFolderDataset(out, "train", num_frames=8, transform=None, train=False)
    clip, label = ds[1]
    assert clip.shape == (8, 3, 40, 56) and label == 1
    first = np.asarray(Image.open(out / "download" / "20bn-jester-v1" / "2" / "00001.jpg"))
    assert np.array_equal(clip[0].permute(1, 2, 0).numpy(), first)
    # GLITR_DATA moves the whole tree
    moved = tmp_path / "moved"
    (project / "data").rename(moved)
    (moved / "jester" / "train_videofolder.txt").unlink()
    monkeypatch.setenv("GLITR_DATA", str(moved))
    code, _, err = glitr("prepare-data", "jester")
    assert code == 0, err
    assert (moved / "jester" / "train_videofolder.txt").read_text() == "1 5 2\n2 7 1\n3 4 0\n"


def test_jester_frames_elsewhere_missing_folder_and_resize(tmp_path):
    src = tmp_path / "dl"
    frames = make_jester_download(src, [
        ("10", "train", "Swiping Left", 5),
        ("11", "train", "No gesture", 3),
        ("12", "validation", "No gesture", 4),
    ])  # fmt: skip
    elsewhere = tmp_path / "frames"
    frames.rename(elsewhere)
    (src / "jester-v1-validation.csv").write_text("12;No gesture\n13;Swiping Left\n")  # 13 has no folder
    s = prepare_jester(src, tmp_path / "out", workers=2, progress=False, frames=elsewhere)
    assert s.failed == [("13", f"{elsewhere / '13'}: frame folder missing")]
    assert (tmp_path / "out" / "val_videofolder.txt").read_text() == "12 4 1\n"
    assert "13\t" in (tmp_path / "out" / "failed.txt").read_text()
    # asked to resize: frames are copied to <out>/frames/<id>/%06d.jpg
    s = prepare_jester(src, tmp_path / "small", workers=2, progress=False, frames=elsewhere, short_side=64)
    assert s.done == 3 and len(s.failed) == 1
    assert sorted(p.name for p in (tmp_path / "small" / "frames" / "10").iterdir()) == [
        f"{i:06d}.jpg" for i in range(1, 6)
    ]
    assert _frame_sizes(tmp_path / "small" / "frames" / "10") == {(90, 64)}
    ds = VideoFolderDataset(tmp_path / "small", "train", num_frames=4)
    assert ds[0][0].shape == (4, 3, 64, 90)


def test_video_decoding_and_options(tmp_path, monkeypatch):
    path = encode_video(tmp_path / "clip.mkv", make_frames(6, 32, 48), "h264-mkv")
    frames = list(iter_video_frames(path))
    assert len(frames) == 6 and frames[0].shape == (32, 48, 3) and frames[0].dtype == np.uint8
    assert list(iter_video_frames(path, short_side=64))[0].shape == (64, 96, 3)
    bad = tmp_path / "bad.webm"
    bad.write_bytes(b"\x1a\x45\xdf\xa3 not really")
    with pytest.raises(GlitrError, match="bad.webm: cannot open as a video"):
        list(iter_video_frames(bad))
    monkeypatch.setenv("GLITR_DATA", str(tmp_path / "d"))
    assert data_root() == tmp_path / "d"
    monkeypatch.delenv("GLITR_DATA")
    assert data_root() == Path("data")


def _one_error_line(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    flat = " ".join(err.split())
    for needle in needles:
        assert needle in flat, (needle, flat)


def test_a_folder_prepared_with_other_settings_is_refused(tmp_path, glitr):
    src = tmp_path / "download"
    make_ssv2_download(src, [(str(i), "train" if i < 3 else "validation", i % 3, "vp9", (48, 64), 6) for i in range(4)])
    out = tmp_path / "out"
    args = ["prepare-data", "ssv2", "--src", src, "--out", out, "--workers", "1"]
    code, _, err = glitr(*args, "--short-side", "32", "--quality", "90")
    assert code == 0, err
    assert json.loads((out / "glitr_prepare.json").read_text()) == {"dataset": "ssv2", "short_side": 32, "quality": 90}
    before = tree_bytes(out)
    code, _, err = glitr(*args, "--short-side", "24", "--quality", "90")
    _one_error_line(code, err, f"{out} was prepared with --short-side 32, this run asks for 24", "--short-side 32")
    code, _, err = glitr(*args, "--short-side", "32")  # the default quality, 95
    _one_error_line(code, err, "--quality 90, this run asks for 95")
    code, _, err = glitr(*args)  # the SSv2 default short side, 256
    _one_error_line(code, err, "--short-side 32, this run asks for 256")
    code, _, err = glitr(*args, "--short-side", "0", "--quality", "90")
    _one_error_line(code, err, "--short-side 32, this run asks for 0")
    assert tree_bytes(out) == before  # nothing written
    # the same settings resume; an interrupted folder (no lists yet) is protected as well
    code, out_text, err = glitr(*args, "--short-side", "32", "--quality", "90")
    assert code == 0 and "0 done, 4 skipped" in out_text, err
    assert tree_bytes(out) == before
    for name in ("train_videofolder.txt", "val_videofolder.txt", "glitr_dataset.json"):
        (out / name).unlink()
    shutil.rmtree(out / "frames" / "3")
    code, _, err = glitr(*args, "--short-side", "48", "--quality", "90")
    _one_error_line(code, err, "--short-side 32, this run asks for 48")
    assert not (out / "frames" / "3").exists()
    code, out_text, err = glitr(*args, "--short-side", "32", "--quality", "90")
    assert code == 0 and "1 done, 3 skipped" in out_text, err
    assert tree_bytes(out) == before
    (out / "glitr_prepare.json").write_text("[1, 2]\n")  # not a record: nothing is assumed
    code, _, err = glitr(*args, "--short-side", "32", "--quality", "90")
    _one_error_line(code, err, f"{out / 'glitr_prepare.json'} is not a settings record")


def test_a_native_jester_folder_is_not_continued_resized(tmp_path, glitr):
    src = tmp_path / "dl"
    make_jester_download(src, [("1", "train", "Swiping Left", 3), ("2", "validation", "No gesture", 3)])
    out = tmp_path / "out"
    code, _, err = glitr("prepare-data", "jester", "--src", src, "--out", out)
    assert code == 0, err
    record = json.loads((out / "glitr_prepare.json").read_text())
    assert record == {"dataset": "jester", "short_side": 0, "quality": None}  # no frames written: no quality
    before = tree_bytes(out)
    code, _, err = glitr("prepare-data", "jester", "--src", src, "--out", out, "--short-side", "32")
    _one_error_line(code, err, "was prepared with --short-side 0, this run asks for 32")
    assert tree_bytes(out) == before
    code, _, err = glitr("prepare-data", "jester", "--src", src, "--out", out)
    assert code == 0, err


def test_a_toy_folder_records_its_generator_settings(tmp_path, glitr):
    out = tmp_path / "toy"
    small = ["--toy-train", "4", "--toy-val", "2", "--toy-test", "0", "--toy-frames", "4", "--toy-size", "64"]
    code, _, err = glitr("prepare-data", "toy", "--out", out, "--workers", "1", *small)
    assert code == 0, err
    record = json.loads((out / "glitr_prepare.json").read_text())
    assert record["dataset"] == "toy" and record["short_side"] == 0 and record["quality"] == 95
    assert record["toy"]["num_train"] == 4 and record["toy"]["size"] == 64
    before = tree_bytes(tmp_path)
    code, _, err = glitr("prepare-data", "toy", "--out", out, *small, "--toy-frames", "6")
    _one_error_line(code, err, f"{out} was prepared with --toy-frames 4, this run asks for 6")
    code, _, err = glitr("prepare-data", "toy", "--out", out, *small, "--short-side", "32")
    _one_error_line(code, err, "--short-side 0, this run asks for 32")
    # another download with other settings, into the same prepared folder
    code, _, err = glitr("prepare-data", "toy", "--out", out, "--src", tmp_path / "other", *small, "--seed", "3")
    _one_error_line(code, err, "--seed 0, this run asks for 3")
    assert tree_bytes(tmp_path) == before and not (tmp_path / "other").exists()
    # the download's own record (toy.json) names the option and both values too
    (out / "glitr_prepare.json").unlink()
    code, _, err = glitr("prepare-data", "toy", "--out", out, *small, "--toy-val", "3")
    _one_error_line(code, err, "holds a toy download made with other settings (--toy-val 2 there, 3 now)")
    code, out_text, err = glitr("prepare-data", "toy", "--out", out, *small)
    assert code == 0 and "0 done, 6 skipped" in out_text, err
    assert tree_bytes(tmp_path) == before


def test_a_folder_of_own_clips_is_not_continued_at_another_size(tmp_path, glitr):
    src = tmp_path / "mine"
    for i, label in enumerate(["cat", "cat", "dog", "dog"]):
        encode_video(src / label / f"{i}.mp4", make_frames(4, 32, 48, seed=i), "h264")
    out = tmp_path / "out"
    code, _, err = glitr("prepare-data", "folder", "--src", src, "--out", out, "--short-side", "24", "-j", "1")
    assert code == 0, err
    record = json.loads((out / "glitr_prepare.json").read_text())
    assert record == {"dataset": "folder", "short_side": 24, "quality": 95}
    before = tree_bytes(out)
    code, _, err = glitr("prepare-data", "folder", "--src", src, "--out", out, "--short-side", "16")
    _one_error_line(code, err, "was prepared with --short-side 24, this run asks for 16")
    assert tree_bytes(out) == before
    code, out_text, err = glitr("prepare-data", "folder", "--src", src, "--out", out, "--short-side", "24")
    assert code == 0 and "0 done, 4 skipped" in out_text, err
