"""`glitr export`: the ONNX step, run by ONNX Runtime over a real toy clip, against the PyTorch predictor."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from glitr_cli.data.toy import ToyConfig, render_clip, sample_clip
from glitr_cli.data.transforms import CentreCrop, eval_transform
from glitr_cli.data.video import encode_video, iter_video_frames
from glitr_cli.engine.loading import load_student
from glitr_cli.engine.onnx import (
    INPUTS,
    OUTPUTS,
    STATE,
    OnnxPredictor,
    cached_step,
    int8_weight_bits,
    quantize_int8,
    step_metadata,
)
from glitr_cli.model import OnlinePredictor

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")


def toy_clip(tmp_path, student, frames: int, seed: int = 3) -> torch.Tensor:
    """A real toy clip of `frames` frames at the student's evaluation size, through VP9: (N, 3, H, W) uint8."""
    cfg = ToyConfig(num_frames=frames, size=student.resize)
    pixels = render_clip(sample_clip(np.random.default_rng(seed), cfg, "ring", "up"), cfg)
    video = np.stack(list(iter_video_frames(encode_video(tmp_path / "clip.webm", pixels, "vp9"))))
    return torch.from_numpy(video).permute(0, 3, 1, 2)


def graphs(graph):
    """`graph` and the branches of its `If`."""
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("g"):
                yield from graphs(attribute.g)


def test_onnx_crop_step_matches_the_sliding_predictor(trained_tiny, tmp_path, glitr):
    """`glitr export --crop`, run as a bare session with the state fed back by hand, over a clip three times
    as long as T: the first T steps through T_c's and T_l's caches, the rest re-running them over the last T
    features; every step's probabilities within 1e-4 of `OnlinePredictor(context="sliding")`, the same boxes."""
    ckpt = trained_tiny / "runs" / "tiny" / "checkpoints" / "last.pt"
    out = tmp_path / "step.onnx"
    code, stdout, err = glitr("export", ckpt, "--out", out, "--crop")
    assert code == 0, err
    assert f"wrote {out}" in stdout

    student = load_student(ckpt)
    t, s = student.num_frames, student.img_size
    source = toy_clip(tmp_path, student, 3 * t)
    geometry = CentreCrop.of(source.shape[3], source.shape[2], s, student.resize)

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == list(INPUTS)
    assert [o.name for o in session.get_outputs()] == list(OUTPUTS)
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["class_names"]) == student.class_names and int(meta["num_frames"]) == t
    assert json.loads(meta["recipe"])["data"]["img_size"] == s and meta["input"] == "crop"

    predictor = OnlinePredictor(student.model, context="sliding")
    state = {i.name: np.zeros(i.shape, np.int64 if "int64" in i.type else np.float32) for i in session.get_inputs()[1:]}
    box = json.loads(meta["first_box"])
    assert box == predictor.next_box()[0].tolist()
    for i in range(len(source)):
        x0, y0, x1, y1 = geometry.source_box(box)
        image = geometry.model_pixels(source[i, :, y0:y1, x0:x1], box)[None]
        ref = predictor.step(crop=image)
        outputs = dict(zip(OUTPUTS, session.run(None, {"frame": image.numpy(), **state}), strict=True))
        np.testing.assert_allclose(outputs["probs"], ref.probs.numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(outputs["glimpse_location"], ref.location.numpy(), atol=1e-5, rtol=0)
        assert outputs["next_box"].tolist() == predictor.next_box().tolist()
        state = {name: outputs[f"next_{name}"] for name in STATE}
        box = outputs["next_box"][0].tolist()
    assert int(state["count"][0]) == 3 * t


@pytest.mark.parametrize("context", ["sliding", "restart"])
def test_onnx_predictor_matches_the_pytorch_predictor(exported_tiny, tmp_path, context):
    """The exported whole-frame step behind `OnlinePredictor`'s interface, in both contexts, over a clip three
    times as long as T: locations, probabilities and next locations within 1e-4 at every step."""
    student = load_student(exported_tiny)
    t = student.num_frames
    inputs = eval_transform(student.img_size, student.resize)(toy_clip(tmp_path, student, 3 * t, seed=4))
    reference = OnlinePredictor(student.model, context=context)
    exported = OnnxPredictor(exported_tiny.with_name("last.pt.step.onnx"), context=context, threads=1)
    for frame in inputs:
        a, b = reference.step(frame[None]), exported.step(frame[None])
        for field in ("location", "probs", "next_location"):  # the logits: log-probabilities here
            torch.testing.assert_close(getattr(b, field), getattr(a, field), atol=1e-4, rtol=0)
        assert (exported.t, exported.frames) == (reference.t, reference.frames)


def test_a_batch_of_two_streams_matches_the_pytorch_step(trained_tiny, tmp_path, glitr):
    """`glitr export --batch-size 2`: a step whose shapes hold two streams; ONNX Runtime runs it on two
    different real toy clips at once, twice as long as T (the cached steps, then sliding), within 1e-4 of
    the PyTorch predictor's batch of two."""
    ckpt = trained_tiny / "runs" / "tiny" / "checkpoints" / "last.pt"
    out = tmp_path / "step2.onnx"
    code, _, err = glitr("export", ckpt, "--out", out, "--batch-size", 2)
    assert code == 0, err
    student = load_student(ckpt)
    t = student.num_frames
    transform = eval_transform(student.img_size, student.resize)
    clips = [transform(toy_clip(tmp_path, student, 2 * t, seed=seed)) for seed in (6, 7)]
    frames = torch.stack(clips, 1)  # (2T, 2, 3, S, S)

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == 2
    state = {i.name: np.zeros(i.shape, np.int64 if "int64" in i.type else np.float32) for i in session.get_inputs()[1:]}
    reference = OnlinePredictor(student.model, batch_size=2, context="sliding")
    for frame in frames:
        ref = reference.step(frame)
        outputs = dict(zip(OUTPUTS, session.run(None, {"frame": frame.numpy(), **state}), strict=True))
        np.testing.assert_allclose(outputs["probs"], ref.probs.numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(outputs["next_location"], ref.next_location.numpy(), atol=1e-4, rtol=0)
        state = {name: outputs[f"next_{name}"] for name in STATE}
    assert not np.allclose(outputs["probs"][0], outputs["probs"][1], atol=1e-3)  # two streams, not one twice


def test_export_mistakes_exit_2(trained_tiny, tmp_path, glitr):
    ckpt = trained_tiny / "runs" / "tiny" / "checkpoints" / "last.pt"
    code, _, err = glitr("export", ckpt, "--out", tmp_path / "step.txt")
    assert code == 2 and "must end in .onnx" in err and len(err.strip().splitlines()) == 1
    code, _, err = glitr("export", tmp_path / "missing.pt")
    assert code == 2 and "not found" in err


def test_the_float_step_holds_each_weight_once_in_its_multiplication_layout(exported_tiny):
    """Every linear weight stored once, (in, out), shared by both branches: no Transpose of a weight is left
    for a runtime to fold (once per branch), and the file holds no more weight bytes than the model."""
    model = onnx.load(exported_tiny.with_name("last.pt.step.onnx"))
    weights = {w.name: w for w in model.graph.initializer}
    transposed = [n for g in graphs(model.graph) for n in g.node if n.op_type == "Transpose" and n.input[0] in weights]
    assert transposed == []
    stored = sum(onnx.numpy_helper.to_array(w).nbytes for w in weights.values())
    parameters = sum(p.numel() * 4 for p in load_student(exported_tiny).model.parameters())
    assert stored < 1.05 * parameters
    assert {"If", "Attention"} <= {n.op_type for n in model.graph.node}


@pytest.mark.parametrize("bits", [7, 8])
def test_int8_step_quantizes_every_linear_layer_and_stays_close(exported_tiny, tmp_path, bits):
    """The int8 step: T_f's linear layers as dynamically quantized products (weights of `bits` bits), T_c's
    and T_l's (in the branches) as blocks of int8 weights, no float product with a weight left; the
    predictions stay close to the float step's on a real toy clip fed to both, the same glimpse locations to
    each (open loop)."""
    float_step = exported_tiny.with_name("last.pt.step.onnx")
    model = quantize_int8(onnx.load(float_step), weight_bits=bits)
    weights = {w.name for w in model.graph.initializer if w.data_type == onnx.TensorProto.FLOAT and len(w.dims) == 2}
    nodes = [n for g in graphs(model.graph) for n in g.node]
    branches = list(graphs(model.graph))[1:]
    assert len(branches) == 2
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= {n.op_type for n in model.graph.node}
    assert all("MatMulNBits" in {n.op_type for n in g.node} for g in branches)
    assert not [n for n in nodes if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights]
    t_f = [w for w in model.graph.initializer if w.data_type == onnx.TensorProto.INT8 and w.name.endswith("_quantized")]
    largest = max(np.abs(onnx.numpy_helper.to_array(w).astype(int)).max() for w in t_f)
    # each channel's largest weight takes the top of the range: [-127, 127], or ONNX Runtime's reduced [-64, 64]
    assert largest == {8: 127, 7: 64}[bits]
    meta = {e.key: e.value for e in model.metadata_props}
    assert meta["precision"] == "int8" and meta["int8_weight_bits"] == str(bits)
    # what `glitr stream --backend onnx-int8` made beside the checkpoint has the bits this CPU holds exactly
    cached = step_metadata(exported_tiny.with_name("last.pt.step-int8.onnx"))
    assert cached["int8_weight_bits"] == str(int8_weight_bits())

    student = load_student(exported_tiny)
    inputs = eval_transform(student.img_size, student.resize)(toy_clip(tmp_path, student, 2 * student.num_frames, 5))
    exact = OnnxPredictor(float_step, threads=1)
    fast = OnnxPredictor(model.SerializeToString(), threads=1)
    location = None
    for frame in inputs:
        a, b = exact.step(frame[None]), fast.step(frame[None], location=location)
        assert (a.probs - b.probs).abs().max() < 0.02 and (a.next_location - b.next_location).abs().max() < 0.02
        location = a.next_location


def test_int8_weights_have_8_bits_where_the_cpu_adds_int8_products_in_32_bits(tmp_path):
    """x86 without VNNI (AVX2's int8 products add pairs in 16 bits): 7 bits; with VNNI, or on ARM: 8; an
    x86 CPU whose features cannot be read: 7."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t\t: fpu sse2 avx avx2 fma\n")
    assert int8_weight_bits(cpuinfo, "x86_64") == 7
    cpuinfo.write_text("flags\t\t: fpu sse2 avx avx2 fma avx512f avx512_vnni\n")
    assert int8_weight_bits(cpuinfo, "x86_64") == 8
    cpuinfo.write_text("flags\t\t: fpu sse2 avx avx2 avx_vnni\n")
    assert int8_weight_bits(cpuinfo, "AMD64") == 8
    assert int8_weight_bits(tmp_path / "missing", "x86_64") == 7
    assert int8_weight_bits(tmp_path / "missing", "aarch64") == 8


def test_the_cache_is_used_until_the_checkpoint_changes(exported_tiny, tmp_path):
    """A checkpoint whose cache beside it was exported from it is not exported again; once the file changes
    (its modification time here) it is."""
    ckpt = shutil.copy2(exported_tiny, tmp_path / "last.pt")
    cache = shutil.copy2(exported_tiny.with_name("last.pt.step.onnx"), tmp_path / "last.pt.step.onnx")
    said: list[str] = []
    assert cached_step(ckpt, notice=said.append) == cache and said == []
    before = cache.stat().st_mtime_ns
    os.utime(ckpt, ns=(before, before + 10**9))
    assert cached_step(ckpt, notice=said.append) == cache
    assert len(said) == 1 and "exporting the online step" in said[0] and cache.stat().st_mtime_ns != before
    assert json.loads(step_metadata(cache)["source"])["mtime_ns"] == before + 10**9


def test_an_int8_cache_made_for_other_bits_is_made_again(exported_tiny, tmp_path):
    """An int8 step cached beside a checkpoint on a shared disk by a CPU that holds other bits is
    quantized again here."""
    ckpt = shutil.copy2(exported_tiny, tmp_path / "last.pt")
    cache = shutil.copy2(exported_tiny.with_name("last.pt.step-int8.onnx"), tmp_path / "last.pt.step-int8.onnx")
    said: list[str] = []
    assert cached_step(ckpt, int8=True, notice=said.append) == cache and said == []
    model = onnx.load(cache)
    other = str(15 - int8_weight_bits())  # 7 <-> 8
    onnx.helper.set_model_props(model, {**{e.key: e.value for e in model.metadata_props}, "int8_weight_bits": other})
    onnx.save(model, cache)
    assert cached_step(ckpt, int8=True, notice=said.append) == cache
    assert len(said) == 1 and "exporting the int8 online step" in said[0]
    assert step_metadata(cache)["int8_weight_bits"] == str(int8_weight_bits())


def test_a_cache_that_cannot_be_written_still_gives_the_step(exported_tiny, tmp_path):
    """Where the cache file cannot be written (here a folder of its name), the step comes back in memory and
    the notice says it will be exported again."""
    ckpt = shutil.copy2(exported_tiny, tmp_path / "last.pt")
    (tmp_path / "last.pt.step.onnx").mkdir()
    said: list[str] = []
    step = cached_step(ckpt, notice=said.append)
    assert isinstance(step, bytes) and "exported again at the next start" in said[-1]
    assert OnnxPredictor(step).metadata["source"]
