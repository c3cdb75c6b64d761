"""`glitr visualize` on videos encoded here: frame counts, boxes where the predictor looks, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from conftest import run_cli
from data_helpers import encode_video
from model_helpers import TINY, tiny_glitr
from PIL import Image

from glitr_cli.data.sampling import FrameSampler
from glitr_cli.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from glitr_cli.data.video import iter_video_frames
from glitr_cli.engine.checkpoint import save_checkpoint
from glitr_cli.engine.decisions import decision_steps
from glitr_cli.engine.online import (
    DECIDED,
    DIM,
    OUTLINE,
    CropGeometry,
    display_size,
    find_checkpoint,
    glimpse_box,
    load_student,
    to_display,
    visualize,
)
from glitr_cli.errors import GlitrError
from glitr_cli.model import OnlinePredictor, extract_glimpse
from glitr_cli.recipe import DataConfig, ModelConfig, Recipe, recipe_to_dict, save_recipe

T, IMG, RESIZE = TINY["num_frames"], TINY["img_size"], 36
CLASSES = ["Square moving left", "Square moving right", "Ring moving up", "Ring moving down"]


# ------------------------------------------------------------------------------------------ fixtures


def write_run(run_dir: Path, kind: str = "glitr", seed: int = 0) -> Path:
    """A run directory as the engine leaves it: checkpoints/last.pt (real save format) and recipe.yaml."""
    recipe = Recipe(
        name=run_dir.name,
        kind=kind,
        data=DataConfig(num_frames=T, img_size=IMG, resize=RESIZE, sampling="whole_clip"),
        model=ModelConfig(**{k: v for k, v in TINY.items() if k not in ("num_classes", "num_frames", "img_size")}),
    )
    model = tiny_glitr(seed)
    state = {
        "kind": kind,
        "model": model.state_dict(),
        "recipe": recipe_to_dict(recipe),
        "class_names": CLASSES,
        "progress": {"epoch": 1, "batch_in_epoch": 0, "step": 3},
    }
    save_checkpoint(state, run_dir / "checkpoints", 3, keep_last=1)
    save_recipe(recipe, run_dir / "recipe.yaml")
    return run_dir / "checkpoints" / "last.pt"


def frames_of(n: int, w: int, h: int, seed: int = 0) -> np.ndarray:
    """Textured frames with a bright square moving across: uint8 (n, h, w, 3)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(40, 200, size=(h // 4 + 1, w // 4 + 1, 3)).repeat(4, 0).repeat(4, 1)[:h, :w]
    out = np.repeat(base[None], n, 0).astype(np.uint8)
    side = max(4, min(w, h) // 5)
    for i in range(n):
        x = int((w - side) * i / max(n - 1, 1))
        out[i, h // 3 : h // 3 + side, x : x + side] = (250, 60, 60)
    return out


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("vis")
    return {
        "root": root,
        "ckpt": write_run(root / "runs" / "tiny"),
        "mp4": encode_video(root / "wide.mp4", frames_of(23, 320, 180), "h264", fps=10),  # H.264, 16:9
        "webm": encode_video(root / "odd.webm", frames_of(13, 97, 131, seed=1), "vp9", fps=10),  # VP9, odd portrait
        "one": encode_video(root / "one.mp4", frames_of(1, 64, 48, seed=2), "h264", fps=10),  # a single frame
    }


def reference(ckpt: Path, frames: list[np.ndarray], context: str = "restart") -> list[tuple[float, float]]:
    """Where the online predictor looks when fed these frames with evaluation preprocessing
    (`context` restart: a fresh predictor every T frames; sliding: the sliding predictor)."""
    student = load_student(ckpt)
    predictor = OnlinePredictor(student.model, context=None if context == "restart" else context)
    transform = eval_transform(IMG, RESIZE)
    locs = []
    for i, f in enumerate(frames):
        if context == "restart" and i and i % T == 0:
            predictor.reset()
        x = transform(torch.from_numpy(f).permute(2, 0, 1)[None])
        locs.append(tuple(predictor.step(x).location[0].tolist()))
    return locs


def gif_frames(path: Path) -> list[np.ndarray]:
    with Image.open(path) as im:
        out = []
        for i in range(im.n_frames):
            im.seek(i)
            out.append(np.asarray(im.convert("RGB")).astype(int))
    return out


def assert_outline(frame: np.ndarray, box: list[float], src: tuple[int, int], dst: tuple[int, int]) -> None:
    """The outline colour sits on the middle of each visible edge of `box` (source pixels)."""
    x0, y0 = to_display(box[0], box[1], src, dst)
    x1, y1 = to_display(box[2], box[3], src, dst)
    x0, y0, x1, y1 = round(x0), round(y0), round(x1), round(y1)
    mx, my = (x0 + x1) // 2, (y0 + y1) // 2
    h, w = frame.shape[:2]
    edges = [(mx, y0), (mx, y1), (x0, my), (x1, my)]
    visible = [(x, y) for x, y in edges if 0 <= x < w and 0 <= y < h]
    assert len(visible) >= 2
    for x, y in visible:
        assert np.abs(frame[y, x] - np.array(OUTLINE)).max() <= 40, (x, y, frame[y, x])


# ------------------------------------------------------------------------------------------ geometry


@pytest.mark.parametrize("w,h", [(320, 180), (97, 131), (50, 50), (33, 200), (1920, 1080)])
def test_boxes_follow_eval_preprocessing(w, h):
    """A coordinate ramp pushed through eval_transform tells where each model-input pixel came from;
    CropGeometry and glimpse_box must agree with it (in the interior, away from resize borders; the
    antialiasing filter, sampled discretely, shifts a ramp by up to a few hundredths of a pixel)."""
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    ramp = torch.stack([xs, ys, xs * 0], 0)[None]  # (1, 3, H, W) holding source coordinates
    out = eval_transform(IMG, RESIZE)(ramp)
    coords = (out * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) * 255
    geo = CropGeometry.of(w, h, RESIZE, IMG)
    for u, v in [(4, 4), (16, 9), (27, 20)]:
        x, y = geo.to_source(u, v)
        assert x == pytest.approx(coords[0, 0, v, u].item(), abs=0.1)
        assert y == pytest.approx(coords[0, 1, v, u].item(), abs=0.1)

    scale = (0.5, 0.5)  # tiny model: 2-patch glimpses on a 4-patch grid
    for loc in [(0.0, 0.0), (0.2, -0.3), (-0.25, 0.1)]:
        crop = extract_glimpse(coords, torch.tensor([loc]), (16, 16), scale)[0]  # samples at the glimpse's extent
        x0, y0, x1, y1 = glimpse_box(loc, geo, scale)
        assert (x0, y0) == pytest.approx((crop[0, 0, 0].item(), crop[1, 0, 0].item()), abs=0.1)
        assert (x1, y1) == pytest.approx((crop[0, -1, -1].item(), crop[1, -1, -1].item()), abs=0.1)


def test_display_size():
    assert display_size(320, 180, 384) == (384, 216)
    assert display_size(97, 131, 384) == (284, 384)
    assert display_size(97, 131, 0) == (97, 131)


# ------------------------------------------------------------------------------------------ rendering


def test_h264_default_frames_and_drawing(assets, tmp_path):
    out, js = tmp_path / "g.gif", tmp_path / "g.json"
    result = visualize(assets["mp4"], checkpoint=assets["ckpt"], out=out, json_path=js, size=0)
    assert json.loads(js.read_text()) == result
    steps = result["frames"]
    whole_clip = FrameSampler(T, "whole_clip").indices(23, train=False)  # the checkpoint recipe's sampling
    assert [s["index"] for s in steps] == whole_clip != FrameSampler(T).indices(23, train=False)
    assert all(set(s) == {"index", "location", "box", "top"} for s in steps)
    assert all(len(s["top"]) == 3 and s["top"][0][0] in CLASSES for s in steps)
    assert all(s["top"][0][1] >= s["top"][1][1] >= s["top"][2][1] for s in steps)

    video = list(iter_video_frames(assets["mp4"]))
    locs = reference(assets["ckpt"], [video[s["index"]] for s in steps])
    gif = gif_frames(out)
    assert len(gif) == T
    geo = CropGeometry.of(320, 180, RESIZE, IMG)
    student = load_student(assets["ckpt"])
    for s, loc, frame, idx in zip(steps, locs, gif, (s["index"] for s in steps), strict=True):
        assert s["location"] == pytest.approx(loc, abs=1e-5)
        assert s["box"] == pytest.approx(glimpse_box(loc, geo, student.model.backbone.glimpse_scale), abs=0.1)
        assert frame.shape[1] == 320 and frame.shape[0] > 180  # the source size, plus the text panel
        assert_outline(frame, s["box"], (320, 180), (320, 180))
        # dimmed outside the glimpse: a corner far from the box keeps DIM of its brightness
        src = video[idx].astype(float)
        corner = (slice(170, 178), slice(2, 10)) if s["box"][0] > 20 else (slice(170, 178), slice(310, 318))
        assert frame[corner].mean() == pytest.approx(DIM * src[corner].mean(), abs=8)
        cx, cy = round((s["box"][0] + s["box"][2]) / 2), round((s["box"][1] + s["box"][3]) / 2)
        inside = (slice(cy + 6, cy + 10), slice(cx + 6, cx + 10))  # clear of the centre mark and the outline
        assert frame[inside].mean() == pytest.approx(src[inside].mean(), abs=12)


def test_vp9_odd_size_every_restarts_after_t(assets, tmp_path):
    out = tmp_path / "g.gif"
    result = visualize(
        assets["webm"], checkpoint=assets["ckpt"], out=out, every=2, side_by_side=True, context="restart"
    )
    steps = result["frames"]
    assert [s["index"] for s in steps] == list(range(0, 13, 2))  # 7 steps: a window of T=5, then a restart
    video = list(iter_video_frames(assets["webm"]))
    locs = reference(assets["ckpt"], [video[i] for i in range(0, 13, 2)])
    init = tuple(load_student(assets["ckpt"]).model.initial_location(1)[0].tolist())
    assert steps[0]["location"] == pytest.approx(init, abs=1e-5)
    assert steps[T]["location"] == pytest.approx(init, abs=1e-5)  # the restart looks where a new stream looks
    for s, loc in zip(steps, locs, strict=True):
        assert s["location"] == pytest.approx(loc, abs=1e-5)
    gif = gif_frames(out)
    assert len(gif) == 7
    dw, dh = display_size(97, 131, 384)
    assert gif[0].shape[1] == dw + 4 + dh  # frame, gap, glimpse crop as wide as the frame is high
    for s, frame in zip(steps, gif, strict=True):
        assert_outline(frame, s["box"], (97, 131), (dw, dh))


def test_every_slides_past_t_by_default(assets, tmp_path):
    result = visualize(assets["webm"], checkpoint=assets["ckpt"], out=tmp_path / "g.gif", every=2)
    steps = result["frames"]
    assert len(steps) == 7 > T
    video = list(iter_video_frames(assets["webm"]))
    locs = reference(assets["ckpt"], [video[i] for i in range(0, 13, 2)], context="sliding")
    for s, loc in zip(steps, locs, strict=True):
        assert s["location"] == pytest.approx(loc, abs=1e-5)
    init = tuple(load_student(assets["ckpt"]).model.initial_location(1)[0].tolist())
    assert steps[T]["location"] != pytest.approx(init, abs=1e-3)  # no restart
    with pytest.raises(GlitrError, match="--context must be one of sliding, restart"):
        visualize(assets["webm"], checkpoint=assets["ckpt"], out=tmp_path / "h.gif", context="forever")


def test_cli_context(assets, tmp_path, glitr):
    """`--context restart` starts again at the initial location after T steps; an unknown mode is one line."""
    js = tmp_path / "g.json"
    ck = ["--checkpoint", assets["ckpt"]]
    code, _, err = glitr(
        "visualize",
        assets["webm"],
        *ck,
        "--out",
        tmp_path / "g.gif",
        "--every",
        2,
        "--context",
        "restart",
        "--json",
        js,
    )
    assert code == 0 and "restarted every 5 steps (2 windows)" in err, err
    steps = json.loads(js.read_text())["frames"]
    assert steps[T]["location"] == pytest.approx(steps[0]["location"], abs=1e-6)
    code, _, err = glitr("visualize", assets["webm"], *ck, "--out", tmp_path / "h.gif", "--context", "forever")
    assert code == 2 and "--context must be one of sliding, restart" in err and len(err.strip().splitlines()) == 1


def test_one_frame_video(assets, tmp_path):
    result = visualize(assets["one"], checkpoint=assets["ckpt"], out=tmp_path / "a.gif")
    assert [s["index"] for s in result["frames"]] == [0] * T  # evaluation repeats the last frame
    assert len(gif_frames(tmp_path / "a.gif")) == T
    result = visualize(assets["one"], checkpoint=assets["ckpt"], out=tmp_path / "b.gif", every=1)
    assert [s["index"] for s in result["frames"]] == [0]
    assert len(gif_frames(tmp_path / "b.gif")) == 1


def test_mp4_output_and_jpeg_folder(assets, tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    video = list(iter_video_frames(assets["webm"]))
    for i, f in enumerate(video):
        Image.fromarray(f).save(folder / f"{i + 1:06d}.jpg", quality=95)
    out = tmp_path / "g.mp4"
    result = visualize(folder, checkpoint=assets["ckpt"], out=out)
    assert [s["index"] for s in result["frames"]] == FrameSampler(T, "whole_clip").indices(len(video), train=False)
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        n = sum(1 for _ in container.decode(stream))
    assert n == T


def test_newest_student_checkpoint_is_found(tmp_path):
    runs = tmp_path / "runs"
    with pytest.raises(GlitrError, match="glitr demo"):
        find_checkpoint(runs)
    old = write_run(runs / "old")
    new = write_run(runs / "demo" / "glitr", seed=1)
    write_run(runs / "demo" / "teacher", kind="teacher")  # newest of all, but a teacher
    assert find_checkpoint(runs) == new
    assert find_checkpoint(runs) != old


# ----------------------------------------------------------------------------------------------- CLI


def test_cli_default_checkpoint_under_runs(assets, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(assets["root"])  # holds runs/tiny/
    out = tmp_path / "g.gif"
    code, _, err = run_cli(
        ["visualize", str(assets["mp4"]), "--out", str(out), "--json", str(tmp_path / "g.json")], monkeypatch, capsys
    )
    assert code == 0, err
    assert "runs/tiny/checkpoints/last.pt" in err  # says which checkpoint it took
    assert len(gif_frames(out)) == T
    assert len(json.loads((tmp_path / "g.json").read_text())["frames"]) == T


def test_cli_mistakes_exit_2_with_one_line(assets, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    garbage = tmp_path / "broken.mp4"
    garbage.write_bytes(np.random.default_rng(0).bytes(5000))
    teacher = write_run(tmp_path / "runs" / "toy_teacher", kind="teacher")
    not_ckpt = tmp_path / "weights.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, not_ckpt)
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    ck = ["--checkpoint", str(assets["ckpt"])]
    cases = {
        "no such video": ["visualize", str(tmp_path / "missing.mp4"), *ck],
        "cannot open as a video": ["visualize", str(garbage), *ck, "--out", str(tmp_path / "x.mp4")],
        "is a teacher checkpoint": ["visualize", str(assets["mp4"]), "--checkpoint", str(teacher)],
        "not a glitr training checkpoint": ["visualize", str(assets["mp4"]), "--checkpoint", str(not_ckpt)],
        str(text): ["visualize", str(assets["mp4"]), "--checkpoint", str(text)],
        "must end in .gif or .mp4": ["visualize", str(assets["mp4"]), *ck, "--out", str(tmp_path / "x.png")],
    }
    for expected, argv in cases.items():
        code, _, err = run_cli(argv, monkeypatch, capsys)
        assert code == 2, (expected, err)
        assert err.startswith("error:") and expected in err, err
        assert len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.mp4", "notes.pt", "runs", "weights.pt"]  # no output
    monkeypatch.chdir(tmp_path / "runs" / "toy_teacher")  # no runs/ here
    code, _, err = run_cli(["visualize", str(assets["mp4"])], monkeypatch, capsys)
    assert code == 2 and "glitr demo" in err and len(err.strip().splitlines()) == 1


def test_checkpoint_written_by_the_trainer(trained_tiny, assets, tmp_path, monkeypatch):
    """The engine's own runs: runs/tiny (student) is found and drawn, runs/tiny_teacher is passed over."""
    monkeypatch.chdir(trained_tiny)
    assert find_checkpoint() == Path("runs/tiny/checkpoints/last.pt")
    result = visualize(assets["webm"], out=tmp_path / "t.gif", json_path=tmp_path / "t.json")
    student = load_student("runs/tiny/checkpoints/last.pt")
    assert len(result["frames"]) == student.num_frames == len(gif_frames(tmp_path / "t.gif"))
    assert all(s["top"][0][0] in student.class_names for s in result["frames"])
    with pytest.raises(GlitrError, match="is a teacher checkpoint"):
        load_student("runs/tiny_teacher/checkpoints/last.pt")


def test_the_docs_python_example_runs(trained_tiny, monkeypatch, capsys):
    """docs/online.md's "Using a trained model from Python" block, run as written on a trained student."""
    page = (Path(__file__).parents[1] / "docs" / "online.md").read_text()
    section = page.split("## Using a trained model from Python", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(trained_tiny)
    exec(code.replace("runs/demo/glitr/checkpoints/last.pt", "runs/tiny/checkpoints/last.pt"), {})
    lines = capsys.readouterr().out.strip().splitlines()
    student = load_student("runs/tiny/checkpoints/last.pt")
    assert len(lines) == student.num_frames
    for line in lines:
        assert any(line.startswith(f"{name} ") for name in student.class_names) and "next glimpse at" in line


def test_the_docs_glimpse_only_example_runs(trained_tiny, monkeypatch, capsys):
    """docs/online.md's glimpse-only block (after the first one, which it reuses), run as written."""
    page = (Path(__file__).parents[1] / "docs" / "online.md").read_text()
    section = page.split("## Using a trained model from Python", 1)[1]
    first, rest = section.split("```python\n", 2)[1:]
    code = first.split("```", 1)[0] + rest.split("```", 1)[0]
    monkeypatch.chdir(trained_tiny)
    exec(code.replace("runs/demo/glitr/checkpoints/last.pt", "runs/tiny/checkpoints/last.pt"), {})
    last = capsys.readouterr().out.strip().splitlines()[-1]
    student = load_student("runs/tiny/checkpoints/last.pt")
    assert last.endswith(f"after {3 * student.num_frames} frames")


def test_decide_marks_the_step_that_decides_with_calibrated_probabilities(assets, tmp_path, glitr):
    plain = visualize(assets["mp4"], checkpoint=assets["ckpt"], out=tmp_path / "plain.gif")["frames"]
    # the run's own evaluation results (RUN/eval.json), as `glitr eval` writes them for this checkpoint
    run = tmp_path / "run"
    shutil.copytree(assets["ckpt"].parents[1], run)
    temperatures = [0.5, 0.4, 0.3, 0.2, 0.1]  # sharper with every step
    evaluation = {"kind": "glitr", "steps": T, "checkpoint": str(run / "checkpoints/last.pt")}
    evaluation |= {"calibration": {"temperature": temperatures}, "early": {"chosen": None}}
    (run / "eval.json").write_text(json.dumps(evaluation))
    calibrated = visualize(
        assets["mp4"], checkpoint=run / "checkpoints/last.pt", out=tmp_path / "c.gif", calibrated=True
    )["frames"]
    confidence = []
    for a, b, temperature in zip(plain, calibrated, temperatures, strict=True):
        log_p = torch.tensor([p for _, p in a["top"]]).log()  # the top 3 of 4 classes: their order is kept
        assert [n for n, _ in b["top"]] == [n for n, _ in a["top"]] and "decided" not in b  # no threshold chosen
        sharper = (log_p / temperature).exp()
        assert b["top"][1][1] / b["top"][0][1] == pytest.approx(float(sharper[1] / sharper[0]), rel=1e-4)
        confidence.append(b["top"][0][1])

    tau = max(confidence[1:3]) - 5e-7
    first = int(decision_steps(torch.tensor([confidence]), tau)[0])
    out = tmp_path / "d.gif"
    code, _, err = glitr(
        "visualize", assets["mp4"], "-c", run / "checkpoints/last.pt", "--calibrated", "--decide", tau,
        "--out", out, "--json", tmp_path / "d.json",
    )  # fmt: skip
    assert code == 0, err
    assert f"decided at tau = {tau:g} at step {first + 1}" in err.replace("\n", " ")
    steps = json.loads((tmp_path / "d.json").read_text())["frames"]
    assert [i for i, s in enumerate(steps) if s.get("decided")] == [first]
    for i, frame in enumerate(gif_frames(out)):  # a frame of DECIDED around the picture of that step only
        assert (np.abs(frame[1, 1] - np.array(DECIDED)).max() == 0) == (i == first)
