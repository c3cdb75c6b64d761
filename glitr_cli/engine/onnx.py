"""`glitr export`: a GliTr student's online step (`model.online.StepGraph`, the state passed in and out)
as an ONNX graph with fixed shapes, its metadata holding what online use needs without the checkpoint;
`quantize_int8` for `--int8`, `cached_step` for `glitr stream -c last.pt --backend onnx`, and
`OnnxPredictor`, the step run by ONNX Runtime behind `OnlinePredictor`'s interface. The inputs, outputs
and metadata: docs/online.md#onnx-export.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import logging
import platform
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from glitr_cli import __version__
from glitr_cli.engine.loading import Student, load_student
from glitr_cli.errors import GlitrError, warn
from glitr_cli.files import atomic_write
from glitr_cli.model import GliTr
from glitr_cli.model.online import CONTEXTS, StepGraph, StepOutput
from glitr_cli.recipe import recipe_from_dict, recipe_to_dict

STATE = ("features", "count", "location", "cls_cache", "loc_cache")  # each fed back from next_{name}
INPUTS = ("frame", *STATE)
OUTPUTS = ("probs", "glimpse_location", "next_location", "next_box", *(f"next_{s}" for s in STATE if s != "location"))
OPSET = 23  # scaled_dot_product_attention as ONNX's Attention
FORMAT = 2  # the step's inputs, outputs and metadata; a file of another format is exported again


EXPORT_TORCH = (2, 8)  # the first PyTorch whose dynamo exporter writes this step (its control flow, opset 23)


def _torch_exports() -> bool:
    return tuple(int(p) for p in torch.__version__.split(".")[:2]) >= EXPORT_TORCH


def onnx_runtime_available() -> bool:
    """Whether this environment can export the step and run it (onnx, onnxscript, onnxruntime, a new
    enough PyTorch)."""
    names = ("onnx", "onnxscript", "onnxruntime")
    return _torch_exports() and all(importlib.util.find_spec(name) is not None for name in names)


def require_onnx() -> None:
    """The exporter needs onnx, onnxscript and PyTorch 2.8; the ONNX packages are not core dependencies."""
    if not _torch_exports():
        need = ".".join(map(str, EXPORT_TORCH))
        raise GlitrError(
            f"glitr export needs PyTorch {need} or newer (this is {torch.__version__}): pip install 'glitr[export]'"
        )
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise GlitrError("glitr export needs onnx and onnxscript: pip install 'glitr[export]'") from None


def step_program(model: GliTr, *, crop: bool = False, batch_size: int = 1) -> Any:
    """`model`'s online step (`StepGraph`) as an ONNX ModelProto, traced from a float32 copy with the
    explicit attention path (plain ONNX ops), its linear weights stored transposed (`fold_weight_transposes`)
    and its geometry in the metadata; `model` itself is left as it was."""
    require_onnx()
    model = copy.deepcopy(model).float()
    model.set_fused_attn(True)  # one ONNX Attention node per attention layer
    model.backbone.set_separable_sampling(True)
    graph = StepGraph(model, crop=crop).eval()
    if crop:
        x0, y0, x1, y1 = graph.first_box(batch_size)[0].tolist()
        image = torch.zeros(batch_size, 3, y1 - y0, x1 - x0)
    else:
        image = torch.zeros(batch_size, 3, model.img_size, model.img_size)
    args = (image, *graph.new_state(batch_size).values())
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
    proto = fold_weight_transposes(program.model_proto)
    backbone = model.backbone
    _set_metadata(
        proto,
        format=str(FORMAT),
        num_frames=str(model.num_frames),
        img_size=str(model.img_size),
        input="crop" if crop else "frame",
        precision="float32",
        first_box=json.dumps(graph.first_box(batch_size)[0].tolist()),
        glimpse_scale=json.dumps(backbone.glimpse_scale),
        glimpse_pixels=str(backbone.glimpse_pixels),
    )
    return proto


def _graphs(graph: Any) -> Iterator[Any]:
    """`graph` and every subgraph in it (the branches of an `If`), outermost first."""
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("g"):
                yield from _graphs(attribute.g)


def fold_weight_transposes(proto: Any) -> Any:
    """`proto` with each weight stored once, in the layout its products read: every 2-D weight that is only
    ever transposed (a linear layer's (out, in) weight, which the exporter multiplies as `x @ Transpose(W)`)
    stored transposed, (in, out), its Transpose nodes gone, and the copies of a weight that the exporter
    folded into each branch of the step's `If` (small ones) merged into one. Done here rather than by a
    runtime's optimiser: ONNX Runtime's constant folding would give each branch its own copy, and its
    quantizer only quantizes a product whose weight is an initializer."""
    from onnx import numpy_helper

    weights = {w.name: w for w in proto.graph.initializer}
    users: dict[str, set[str]] = {}
    for graph in _graphs(proto.graph):
        for node in graph.node:
            for name in node.input:
                users.setdefault(name, set()).add(node.op_type)
    folded = {name for name, w in weights.items() if len(w.dims) == 2 and users.get(name) == {"Transpose"}}
    renamed: dict[str, str] = {}  # a Transpose's output, or a weight's copy -> the weight that replaces it
    for graph in list(_graphs(proto.graph)):
        for i in reversed(range(len(graph.node))):  # deleting in place keeps the subgraphs' messages in place
            node = graph.node[i]
            if node.op_type == "Transpose" and node.input[0] in folded:
                renamed[node.output[0]] = node.input[0]
                del graph.node[i]
    for name in folded:
        weights[name].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weights[name]).T.copy(), name))
    first: dict[tuple, str] = {}
    for name, w in weights.items():
        array = numpy_helper.to_array(w)
        original = first.setdefault((array.dtype.str, array.shape, array.tobytes()), name)
        if original != name:
            renamed[name] = original
            proto.graph.initializer.remove(w)
    for graph in _graphs(proto.graph):
        for node in graph.node:
            node.input[:] = [renamed.get(name, name) for name in node.input]
        stale = [v for v in graph.value_info if v.name in renamed or v.name in folded]  # shapes changed
        for v in stale:
            graph.value_info.remove(v)
    return proto


def _metadata(proto: Any) -> dict[str, str]:
    return {e.key: e.value for e in proto.metadata_props}


def _set_metadata(proto: Any, **entries: str) -> None:
    import onnx

    onnx.helper.set_model_props(proto, {**_metadata(proto), **entries})


def int8_weight_bits(cpuinfo: Path = Path("/proc/cpuinfo"), machine: str | None = None) -> int:
    """The bits of T_f's int8 weights that this CPU's int8 products hold exactly: 8, or 7 on an x86 CPU
    without VNNI (AVX2 only), whose products add pairs in 16 bits, which 8-bit weights times uint8
    inputs overflow. An x86 CPU whose features cannot be read (`cpuinfo`) counts as one without VNNI."""
    if (machine or platform.machine()).lower() not in ("x86_64", "amd64", "i386", "i686"):
        return 8  # ARM's int8 dot products add in 32 bits
    try:
        flags = cpuinfo.read_text()
    except OSError:
        return 7
    return 8 if re.search(r"\b(avx512_vnni|avx_vnni)\b", flags) else 7


def quantize_int8(proto: Any, weight_bits: int | None = None) -> Any:
    """`proto` with int8 linear layers, each kind with the ONNX Runtime quantizer that keeps its decisions
    best (docs/online.md#int8): T_f (the main graph) dynamically, `weight_bits` (default: what this CPU
    holds exactly, `int8_weight_bits`) per output channel; T_c and T_l (the `If` branches, one token a
    step) as `MatMulNBits` blocks of 32 with signed inputs, whose per-block input scales keep the token
    from being lost to its largest values. The bits are in the metadata (`int8_weight_bits`)."""
    import onnx

    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError:
        raise GlitrError("int8 quantization needs onnxruntime: pip install 'glitr[export]'") from None

    weights = {w.name for w in proto.graph.initializer if len(w.dims) == 2}
    main = {node.name for node in proto.graph.node}
    linear = {  # products with a linear layer's weight (not of activations, nor with the sampler's tables)
        node.name
        for graph in _graphs(proto.graph)
        for node in graph.node
        if node.op_type == "MatMul" and node.input[1] in weights
    }
    others = [node.name for graph in _graphs(proto.graph) for node in graph.node if node.op_type == "MatMul"]
    bits = int8_weight_bits() if weight_bits is None else weight_bits
    if bits not in (7, 8):
        raise GlitrError(f"int8 weights have 7 or 8 bits, got {bits}")
    with tempfile.TemporaryDirectory() as tmp, _quiet_quantizers():
        raw, out = Path(tmp, "float.onnx"), Path(tmp, "int8.onnx")
        onnx.save(proto, raw)
        quantize_dynamic(
            raw,
            out,
            ["MatMul"],
            per_channel=True,
            reduce_range=bits == 7,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=[name for name in others if name not in linear & main],
        )
        blocks = MatMulNBitsQuantizer(
            onnx.load(out),
            bits=8,
            block_size=32,
            is_symmetric=True,
            accuracy_level=4,  # int8 products of the quantized input blocks
            nodes_to_exclude=[name for name in others if name not in linear - main],
        )
        blocks.process()
        quantized = blocks.model.model
    _set_metadata(quantized, **{**_metadata(proto), "precision": "int8", "int8_weight_bits": str(bits)})
    return quantized


@contextlib.contextmanager
def _quiet_quantizers() -> Iterator[None]:
    """ONNX Runtime's quantizers log through the root logger (advice for other models, progress lines)."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def student_step(
    student: Student, *, crop: bool = False, batch_size: int = 1, int8: bool = False, source: str = ""
) -> Any:
    """`student`'s online step as an ONNX ModelProto (int8 linear layers with `int8`), its metadata holding
    what online use needs: class names, recipe, geometry. `source` (`cached_step`) records which checkpoint
    file it came from."""
    proto = step_program(student.model, crop=crop, batch_size=batch_size)
    if int8:
        proto = quantize_int8(proto)
    _set_metadata(
        proto,
        class_names=json.dumps(student.class_names),
        resize=str(student.resize),
        recipe=json.dumps(recipe_to_dict(student.recipe)),
        checkpoint=str(student.path),
        source=source,
    )
    return proto


def export_onnx(
    checkpoint: str | Path, out: str | Path, *, crop: bool = False, batch_size: int = 1, int8: bool = False
) -> dict[str, str]:
    """Write `checkpoint`'s online step to `out` (ONNX, int8 linear layers with `int8`); returns the
    metadata written with it."""
    require_onnx()
    out = Path(out)
    if out.suffix.lower() != ".onnx":
        raise GlitrError(f"--out {out}: the output must end in .onnx")
    if batch_size < 1:
        raise GlitrError(f"--batch-size must be 1 or more, got {batch_size}")
    proto = student_step(load_student(checkpoint), crop=crop, batch_size=batch_size, int8=int8)
    atomic_write(out, lambda f: f.write(proto.SerializeToString()))
    return _metadata(proto)


def _source_key(checkpoint: Path) -> str:
    """What identifies a checkpoint file's contents for the cache: its size and modification time, and the
    glitr version and step format that exported it."""
    stat = checkpoint.stat()
    return json.dumps({"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "glitr": __version__, "format": FORMAT})


def cached_step(checkpoint: str | Path, *, int8: bool = False, notice: Callable[[str], Any] = print) -> Path | bytes:
    """The exported step of a `.pt` checkpoint (float32, or int8 with `int8`), from a cache beside it
    (`last.pt` -> `last.pt.step.onnx`, `last.pt.step-int8.onnx`). It is exported (`notice` says so) when
    the cache is missing, was exported from a checkpoint file of another size or modification time, or
    (int8) has weights of other bits than this CPU holds exactly (`int8_weight_bits`); where
    nothing can be written beside the checkpoint, the step comes back as bytes, exported again next time."""
    require_onnx()
    checkpoint = Path(checkpoint)
    student = None if checkpoint.is_file() else load_student(checkpoint)  # the loader's message when missing
    cache = checkpoint.with_name(f"{checkpoint.name}.step{'-int8' if int8 else ''}.onnx")
    key = _source_key(checkpoint)
    meta = step_metadata(cache) if cache.is_file() else {}
    # an int8 step made where the CPU held other bits (a checkpoint on a cluster's shared disk) is made again
    if meta.get("source") == key and (not int8 or meta.get("int8_weight_bits") == str(int8_weight_bits())):
        return cache
    notice(f"exporting the {'int8 ' if int8 else ''}online step of {checkpoint} to {cache} (once per checkpoint)")
    data = student_step(student or load_student(checkpoint), int8=int8, source=key).SerializeToString()
    try:
        atomic_write(cache, lambda f: f.write(data))
    except OSError as e:
        notice(f"cannot keep it beside the checkpoint ({e.strerror or e}): exported again at the next start")
        return data
    return cache


def step_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of an ONNX file (empty when it is no readable ONNX model)."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        proto = onnx.load(path, load_external_data=False)
    except (OSError, DecodeError):
        return {}
    return _metadata(proto)


# ------------------------------------------------------------------------------------- running it


def exported_student(predictor: OnnxPredictor) -> Student:
    """The `Student` an exported step file stands for, from its metadata: class names and recipe, no model
    (the step runs in `predictor` alone)."""
    meta, name = predictor.metadata, predictor.name
    if "recipe" not in meta or "class_names" not in meta:
        raise GlitrError(f"{name}: holds no recipe or class names (an older `glitr export`?); export it again")
    recipe = recipe_from_dict(json.loads(meta["recipe"]), f"the recipe stored in {name}")
    return Student(None, Path(name), json.loads(meta["class_names"]), recipe)


class OnnxPredictor:
    """An exported step (a file or its bytes) run by ONNX Runtime on the CPU with `OnlinePredictor`'s
    interface for one stream of whole model inputs; `context` "restart" starts a new state after T steps,
    `threads` is ONNX Runtime's intra-op thread count (0: one per physical core). The state stays in two
    sets of buffers that ONNX Runtime reads and writes in place (IO binding), so nothing is copied between
    steps."""

    def __init__(self, step: str | Path | bytes, context: str = "sliding", threads: int = 0) -> None:
        try:
            import onnxruntime as ort  # optional, like the exporter
        except ImportError:
            raise GlitrError("the ONNX backend needs onnxruntime: pip install 'glitr[export]'") from None
        if context not in CONTEXTS:
            raise GlitrError(f"unknown context {context!r}; expected one of {', '.join(CONTEXTS)}")
        self.context = context
        self.name = "the exported step" if isinstance(step, bytes) else str(step)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # between operators the workers sleep rather than spin: a spinning worker holds a core that the
        # stream's reader (decoding) or another process needs, and every operator then waits for the
        # worker the scheduler put aside
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        source = step if isinstance(step, bytes) else str(step)
        try:
            self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime's own exception types (InvalidProtobuf, NoSuchFile, Fail, ...)
            reason = str(e).splitlines()[0]
            raise GlitrError(f"{self.name}: not an ONNX model ONNX Runtime can run ({reason})") from None
        self.metadata = self.session.get_modelmeta().custom_metadata_map
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        if list(inputs) != list(INPUTS) or outputs != list(OUTPUTS) or self.metadata.get("format") != str(FORMAT):
            raise GlitrError(f"{self.name}: not an online step of this glitr's `glitr export`; export it again")
        if self.metadata.get("input") != "frame" or inputs["frame"].shape[0] != 1:
            raise GlitrError(
                f"{self.name}: runs here as one stream of whole frames; export it without --crop and --batch-size"
            )
        bits = self.metadata.get("int8_weight_bits")
        if bits is not None and int(bits) > int8_weight_bits():
            warn(
                Console(stderr=True),
                f"{self.name}: int8 weights of {bits} bits, made for a CPU with VNNI; this CPU's int8 products "
                "can overflow on them. Quantize it here: glitr export --int8 (7 bits)",
            )
        self.num_frames = int(self.metadata["num_frames"])
        self.glimpse_scale = tuple(json.loads(self.metadata["glimpse_scale"]))
        self.glimpse_pixels = int(self.metadata["glimpse_pixels"])

        def buffer(arg: Any) -> np.ndarray:
            return np.zeros(arg.shape, np.int64 if arg.type == "tensor(int64)" else np.float32)

        # two sets of state buffers and one of outputs, each wrapped once as an OrtValue (no copy)
        self._states = [{name: buffer(inputs[name]) for name in STATE} for _ in range(2)]
        self._outputs = {name: buffer(self.session.get_outputs()[OUTPUTS.index(name)]) for name in OUTPUTS[:2]}
        wrap = ort.OrtValue.ortvalue_from_numpy
        self._state_values = [{name: wrap(a) for name, a in state.items()} for state in self._states]
        self._binding = self.session.io_binding()
        for name, array in self._outputs.items():
            self._binding.bind_ortvalue_output(name, wrap(array))
        self.reset()

    def reset(self) -> None:
        """Start a new stream."""
        self.frames = 0
        self._new_window()

    def _new_window(self) -> None:
        self.t = 0
        self._current = 0
        for array in self._states[0].values():
            array.fill(0)

    def step(self, frame: torch.Tensor, location: torch.Tensor | None = None) -> StepOutput:
        """One frame (1, 3, S, S); `location` (1, 2), when given, replaces where the step before chose to
        look next (open-loop comparisons; a new stream's first glimpse stays at the learned location)."""
        if self.context == "restart" and self.t == self.num_frames:
            self._new_window()
        state, values = self._states[self._current], self._state_values[self._current]
        if location is not None:
            state["location"][:] = location.detach().float().cpu().numpy()
        written = self._state_values[1 - self._current]
        binding = self._binding
        binding.bind_cpu_input("frame", np.ascontiguousarray(frame.detach().float().cpu().numpy()))
        for name in STATE:
            binding.bind_ortvalue_input(name, values[name])
            binding.bind_ortvalue_output("next_location" if name == "location" else f"next_{name}", written[name])
        self.session.run_with_iobinding(binding)
        self._current = 1 - self._current
        self.t = min(self.t + 1, self.num_frames)
        self.frames += 1
        out = self._outputs
        probs = torch.from_numpy(out["probs"].copy())
        loc = torch.from_numpy(out["glimpse_location"].copy())
        if self.frames == 1:
            self._first = loc  # the learned first location, where every new window looks first
        nxt = torch.from_numpy(self._states[self._current]["location"].copy())
        if self.context == "restart" and self.t == self.num_frames:
            nxt = self._first.clone()
        return StepOutput(loc, None, probs, nxt)
