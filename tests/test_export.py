"""`glitr export`: the ONNX step, run by ONNX Runtime over a real toy clip, against the PyTorch predictor."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from glitr_cli.data.toy import ToyConfig, render_clip, sample_clip
from glitr_cli.data.transforms import CentreCrop, eval_transform
from glitr_cli.data.video import encode_video, iter_video_frames
from glitr_cli.engine.loading import load_student
from glitr_cli.engine.onnx import INPUTS, OUTPUTS
from glitr_cli.model import OnlinePredictor

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.mark.parametrize("crop", [False, True])
def test_onnx_step_matches_the_sliding_predictor(trained_tiny, tmp_path, glitr, crop):
    ckpt = trained_tiny / "runs" / "tiny" / "checkpoints" / "last.pt"
    out = tmp_path / "step.onnx"
    code, stdout, err = glitr("export", ckpt, "--out", out, *(["--crop"] if crop else []))
    assert code == 0, err
    assert f"wrote {out}" in stdout

    student = load_student(ckpt)
    t, s = student.num_frames, student.img_size
    cfg = ToyConfig(num_frames=3 * t, size=student.resize)  # a clip three times as long as the model's context
    frames = render_clip(sample_clip(np.random.default_rng(3), cfg, "ring", "up"), cfg)
    video = torch.from_numpy(np.stack(list(iter_video_frames(encode_video(tmp_path / "clip.webm", frames, "vp9")))))
    source = video.permute(0, 3, 1, 2)  # (N, 3, H, W) uint8
    inputs = eval_transform(s, student.resize)(source)  # (N, 3, S, S)
    geometry = CentreCrop.of(source.shape[3], source.shape[2], s, student.resize)

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == list(INPUTS)
    assert [o.name for o in session.get_outputs()] == list(OUTPUTS)
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["class_names"]) == student.class_names and int(meta["num_frames"]) == t

    predictor = OnlinePredictor(student.model, context="sliding")
    d = student.model.backbone.embed_dim
    state = {
        "features": np.zeros((1, t, d), np.float32),
        "count": np.zeros(1, np.int64),
        "location": np.zeros((1, 2), np.float32),
    }
    box = json.loads(meta["first_box"])
    assert box == predictor.next_box()[0].tolist()
    for i in range(len(source)):
        if crop:
            x0, y0, x1, y1 = geometry.source_box(box)
            image = geometry.model_pixels(source[i, :, y0:y1, x0:x1], box)[None]
            ref = predictor.step(crop=image)
        else:
            image = inputs[i : i + 1]
            ref = predictor.step(image)
        probs, loc, nxt, next_box, features, count = session.run(None, {"frame": image.numpy(), **state})
        np.testing.assert_allclose(probs, ref.probs.numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(loc, ref.location.numpy(), atol=1e-5, rtol=0)
        assert next_box.tolist() == predictor.next_box().tolist()
        state = {"features": features, "count": count, "location": nxt}
        box = next_box[0].tolist()
    assert int(state["count"][0]) == 3 * t


def test_export_mistakes_exit_2(trained_tiny, tmp_path, glitr):
    ckpt = trained_tiny / "runs" / "tiny" / "checkpoints" / "last.pt"
    code, _, err = glitr("export", ckpt, "--out", tmp_path / "step.txt")
    assert code == 2 and "must end in .onnx" in err and len(err.strip().splitlines()) == 1
    code, _, err = glitr("export", tmp_path / "missing.pt")
    assert code == 2 and "not found" in err


def test_int8_export_quantizes_the_linear_layers_and_stays_close(trained_tiny, tmp_path, glitr):
    """`--int8`: the linear layers run as int8 products, the rest stays float32, and the predictions stay close
    to the float step's over a real toy clip fed through both ONNX predictors."""
    onnx = pytest.importorskip("onnx")
    from glitr_cli.engine.onnx import OnnxPredictor

    ckpt = trained_tiny / "runs" / "tiny" / "checkpoints" / "last.pt"
    out = tmp_path / "step_int8.onnx"
    code, stdout, err = glitr("export", ckpt, "--out", out, "--int8")
    assert code == 0, err
    assert "int8" in stdout
    graph = onnx.load(out).graph
    ops = {node.op_type for node in graph.node}
    assert "DynamicQuantizeMatMul" in ops or "MatMulInteger" in ops
    assert "Gemm" not in ops and "GridSample" in ops  # every linear layer quantized, the sampler float
    int8_weights = [w for w in graph.initializer if w.data_type == onnx.TensorProto.INT8]
    assert len(int8_weights) >= 4
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_modelmeta().custom_metadata_map["precision"] == "int8"

    student = load_student(ckpt)
    cfg = ToyConfig(num_frames=student.num_frames, size=student.resize)
    frames = render_clip(sample_clip(np.random.default_rng(5), cfg, "ring", "left"), cfg)
    inputs = eval_transform(student.img_size, student.resize)(torch.from_numpy(frames).permute(0, 3, 1, 2))
    exact, fast = OnnxPredictor(student.model), OnnxPredictor(student.model, int8=True)
    for frame in inputs:
        a, b = exact.step(frame[None]), fast.step(frame[None])
        assert (a.probs - b.probs).abs().max() < 0.02
        assert (a.next_location - b.next_location).abs().max() < 0.02
