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
kind and `first_box`, the box a new stream's first glimpse reads (what a --crop caller cuts first).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from glitr_cli.engine.loading import load_student
from glitr_cli.errors import GlitrError
from glitr_cli.model.online import StepGraph

INPUTS = ("frame", "features", "count", "location")
OUTPUTS = ("probs", "glimpse_location", "next_location", "next_box", "next_features", "next_count")
OPSET = 20  # affine_grid and grid_sample as ONNX ops


def export_onnx(checkpoint: str | Path, out: str | Path, *, crop: bool = False, batch_size: int = 1) -> dict[str, Any]:
    """Write `checkpoint`'s online step to `out` (ONNX); returns the metadata written with it."""
    try:
        import onnx  # noqa: F401  (the exporter needs it and onnxscript; neither is a core dependency)
        import onnxscript  # noqa: F401
    except ImportError:
        raise GlitrError("glitr export needs onnx and onnxscript: pip install 'glitr[export]'") from None
    out = Path(out)
    if out.suffix.lower() != ".onnx":
        raise GlitrError(f"--out {out}: the output must end in .onnx")
    if batch_size < 1:
        raise GlitrError(f"--batch-size must be 1 or more, got {batch_size}")
    student = load_student(checkpoint)
    model = student.model.float()
    model.set_fused_attn(False)  # the explicit softmax path: plain ONNX ops
    graph = StepGraph(model, crop=crop).eval()
    s, t, d = model.img_size, model.num_frames, model.backbone.embed_dim
    first_box = graph.first_box(batch_size)
    if crop:
        x0, y0, x1, y1 = first_box[0].tolist()
        image = torch.zeros(batch_size, 3, y1 - y0, x1 - x0)
    else:
        image = torch.zeros(batch_size, 3, s, s)
    args = (image, torch.zeros(batch_size, t, d), torch.zeros(1, dtype=torch.long), torch.zeros(batch_size, 2))
    out.parent.mkdir(parents=True, exist_ok=True)
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
    metadata = {
        "class_names": json.dumps(student.class_names),
        "num_frames": str(t),
        "img_size": str(s),
        "resize": str(student.resize),
        "input": "crop" if crop else "frame",
        "first_box": json.dumps(first_box[0].tolist()),
        "checkpoint": str(student.path),
    }
    proto = program.model_proto
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    tmp = out.with_name(f".{out.name}.partial")
    tmp.write_bytes(proto.SerializeToString())
    tmp.replace(out)
    return metadata
