"""`glitr export`: a GliTr student's online step as an ONNX graph.

The graph is `model.online.StepGraph`, the sliding predictor's step with its state passed in and out
(ONNX Runtime, or any ONNX engine, keeps no state between calls):

    inputs   frame          float32 (B, 3, S, S)  the normalised model input (evaluation's resize,
                            centre crop, ImageNet normalisation); with --crop instead the pixels of
                            the box the previous step returned as next_box (B, 3, h, w), zeros outside
                            the model input
             features       float32 (B, T, D)     the last T glimpse features (zeros for a new stream)
             count          int64 (1,)            frames seen so far (0 for a new stream)
             location       float32 (B, 2)        where to look (next_location of the previous step;
                                                  ignored while count is 0: the learned first location)
    outputs  probs          float32 (B, C)        class probabilities given every frame in the context
             glimpse_location float32 (B, 2)      where this frame's glimpse was taken
             next_location  float32 (B, 2)        where the next one will be taken
             next_box       int64 (B, 4)          the model-input pixels (x0, y0, x1, y1), end exclusive,
                                                  that the next glimpse reads
             next_features, next_count            the state for the next call

The model's metadata (`metadata_props`) holds the class names, T, S, the recipe's resize, the input
kind, the precision and `first_box`, the box a new stream's first glimpse reads (what a --crop caller
cuts first).

`--int8` (`quantize_int8`) is ONNX Runtime's dynamic quantization of the graph: the weights of every
linear layer (MatMul, Gemm) stored as 7-bit integers in int8, one scale per output channel, and their
inputs quantized to uint8 per tensor at run time; convolutions, attention products, norms and the
glimpse sampler stay float32. It is an approximation of the float model, for CPUs where the float
step is too slow.

`OnnxPredictor` runs the step with ONNX Runtime behind `OnlinePredictor`'s interface (`glitr stream
--backend onnx`, `glitr bench`).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from glitr_cli.engine.loading import load_student
from glitr_cli.errors import GlitrError
from glitr_cli.files import atomic_write
from glitr_cli.model import GliTr
from glitr_cli.model.online import CONTEXTS, StepGraph, StepOutput

INPUTS = ("frame", "features", "count", "location")
OUTPUTS = ("probs", "glimpse_location", "next_location", "next_box", "next_features", "next_count")
OPSET = 20  # affine_grid and grid_sample as ONNX ops


def onnx_runtime_available() -> bool:
    """Whether this environment can export the step and run it (onnx, onnxscript, onnxruntime)."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxscript", "onnxruntime"))


def require_onnx() -> None:
    """The exporter needs onnx and onnxscript; neither is a core dependency."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise GlitrError("glitr export needs onnx and onnxscript: pip install 'glitr[export]'") from None


def step_program(model: GliTr, *, crop: bool = False, batch_size: int = 1) -> Any:
    """`model`'s sliding step (`StepGraph`) as an ONNX ModelProto, traced from a float32 copy with the
    explicit attention path (plain ONNX ops); `model` itself is left as it was."""
    require_onnx()
    model = copy.deepcopy(model).float()
    model.set_fused_attn(False)
    graph = StepGraph(model, crop=crop).eval()
    s, t, d = model.img_size, model.num_frames, model.backbone.embed_dim
    if crop:
        x0, y0, x1, y1 = graph.first_box(batch_size)[0].tolist()
        image = torch.zeros(batch_size, 3, y1 - y0, x1 - x0)
    else:
        image = torch.zeros(batch_size, 3, s, s)
    args = (image, torch.zeros(batch_size, t, d), torch.zeros(1, dtype=torch.long), torch.zeros(batch_size, 2))
    with torch.no_grad():
        program = torch.onnx.export(
            graph,
            args,
            input_names=list(INPUTS),
            output_names=list(OUTPUTS),
            opset_version=OPSET,
            dynamo=True,
            verbose=False,
        )
    return program.model_proto


def quantize_int8(proto: Any) -> Any:
    """`proto` with int8 linear layers (ONNX Runtime's dynamic quantization, per-channel weights), after
    the pre-processing ONNX Runtime asks for (shape inference, graph optimisation)."""
    import onnx

    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        raise GlitrError("int8 quantization needs onnxruntime: pip install 'glitr[export]'") from None

    with tempfile.TemporaryDirectory() as tmp:
        raw, ready, out = Path(tmp, "float.onnx"), Path(tmp, "ready.onnx"), Path(tmp, "int8.onnx")
        onnx.save(proto, raw)
        quant_pre_process(raw, ready, skip_symbolic_shape=True)
        # 7-bit weights (reduce_range): the int8 products of x86 CPUs without VNNI add pairs of them in 16 bits,
        # which full-range weights overflow
        quantize_dynamic(
            ready, out, ["MatMul", "Gemm"], per_channel=True, reduce_range=True, weight_type=QuantType.QInt8
        )
        return onnx.load(out)


def export_onnx(
    checkpoint: str | Path, out: str | Path, *, crop: bool = False, batch_size: int = 1, int8: bool = False
) -> dict[str, Any]:
    """Write `checkpoint`'s online step to `out` (ONNX, int8 linear layers with `int8`); returns the
    metadata written with it."""
    require_onnx()
    out = Path(out)
    if out.suffix.lower() != ".onnx":
        raise GlitrError(f"--out {out}: the output must end in .onnx")
    if batch_size < 1:
        raise GlitrError(f"--batch-size must be 1 or more, got {batch_size}")
    student = load_student(checkpoint)
    proto = step_program(student.model, crop=crop, batch_size=batch_size)
    if int8:
        proto = quantize_int8(proto)
    model = student.model
    metadata = {
        "class_names": json.dumps(student.class_names),
        "num_frames": str(model.num_frames),
        "img_size": str(model.img_size),
        "resize": str(student.resize),
        "input": "crop" if crop else "frame",
        "precision": "int8" if int8 else "float32",
        "first_box": json.dumps(StepGraph(model).first_box(batch_size)[0].tolist()),
        "checkpoint": str(student.path),
    }
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    atomic_write(out, lambda f: f.write(proto.SerializeToString()))
    return metadata


# ------------------------------------------------------------------------------------- running it


class OnnxPredictor:
    """The exported sliding step run by ONNX Runtime, with `OnlinePredictor`'s interface for one stream
    of whole model inputs: `step(frame (1, 3, S, S))` -> `StepOutput`, `t` (in the current context,
    at most T), `frames` (since the start). `context` "restart" starts from a new state after T steps,
    which is what `OnlinePredictor(context="restart")` computes; "sliding" is the graph itself.
    `threads` sets ONNX Runtime's intra-op threads (0: its default); `int8` runs the graph of
    `glitr export --int8`."""

    def __init__(self, model: GliTr, context: str = "sliding", threads: int = 0, int8: bool = False) -> None:
        try:
            import onnxruntime as ort  # optional, like the exporter
        except ImportError:
            raise GlitrError("the ONNX backend needs onnxruntime: pip install 'glitr[export]'") from None
        if context not in CONTEXTS:
            raise GlitrError(f"unknown context {context!r}; expected one of {', '.join(CONTEXTS)}")
        self.context = context
        self.num_frames, self._dim = model.num_frames, model.backbone.embed_dim
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        proto = step_program(model, batch_size=1)
        if int8:
            proto = quantize_int8(proto)
        self.session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        self.reset()

    def reset(self) -> None:
        """Start a new stream."""
        self.frames = 0
        self._new_window()

    def _new_window(self) -> None:
        self.t = 0
        self._state = {
            "features": np.zeros((1, self.num_frames, self._dim), np.float32),
            "count": np.zeros(1, np.int64),
            "location": np.zeros((1, 2), np.float32),
        }

    def step(self, frame: torch.Tensor) -> StepOutput:
        if self.context == "restart" and self.t == self.num_frames:
            self._new_window()
        image = frame.detach().float().cpu().numpy()
        probs, loc, nxt, _, features, count = self.session.run(None, {"frame": image, **self._state})
        self._state = {"features": features, "count": count, "location": nxt}
        self.t = min(self.t + 1, self.num_frames)
        self.frames += 1
        return StepOutput(torch.from_numpy(loc), None, torch.from_numpy(probs), torch.from_numpy(nxt))
