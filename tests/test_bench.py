"""The speed paths compute the same function as the plain (original-style) path, and `glitr bench` runs."""

import copy
import json
import mmap
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from model_helpers import clips, tiny_glitr

from glitr_cli import bench  # not `setup` itself: pytest 8.0 calls a test module's `setup` as nose's set-up
from glitr_cli.bench import BenchSettings, Measurements, derived, peak_memory, set_fused_attention, training
from glitr_cli.engine.onnx import onnx_runtime_available
from glitr_cli.model import StudentObjective, TeacherObjective
from glitr_cli.model.reference import PlainStudentObjective, PlainTeacherObjective, plain_student_forward
from glitr_cli.recipe import load_recipe


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(a: dict, b: dict, tol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=tol, atol=tol, msg=k)


@pytest.mark.parametrize("dtype,smooth,tol", [(torch.float64, False, 1e-9), (torch.float32, True, 1e-4)])
def test_student_fast_path_equals_plain_path(dtype, smooth, tol):
    """KV-cached T_l, one causal T_c pass and fused attention give the plain path's losses and gradients."""
    student, teacher = tiny_glitr(0).to(dtype), tiny_glitr(1).to(dtype)
    x, y = clips(smooth=smooth).to(dtype), torch.tensor([1, 3])
    fast = StudentObjective(student, teacher).train()(x, y)
    fast["loss"].backward()
    fast_grads = _grads(student)
    student.zero_grad(set_to_none=True)
    student.set_fused_attn(False)
    plain = PlainStudentObjective(student, teacher).train()(x, y)
    plain["loss"].backward()
    for k in ("loss", "cls", "spatial", "temporal"):
        torch.testing.assert_close(fast[k], plain[k].detach(), rtol=tol, atol=tol)
    _assert_same(fast_grads, _grads(student), tol)
    with torch.no_grad():
        out = student.forward_student(x)
        ref = plain_student_forward(student, x)
    for a, b in zip(out, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("extra", [{}, {"glimpse_reading": 0.5, "loc_centring": 2.0}])
def test_teacher_fast_path_equals_deep_copy_path(extra):
    model = tiny_glitr().double()
    x, y = clips().double(), torch.tensor([0, 2])
    torch.manual_seed(0)  # the same random glimpse places for both
    fast = TeacherObjective(model, **extra)(x, y)
    fast["loss"].backward()
    fast_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    plain = PlainTeacherObjective(model, **extra)(x, y)
    plain["loss"].backward()
    terms = ("reading", "centring") if extra else ()
    assert all(k in fast for k in terms)
    for k in ("loss", "cls", "loc_mse", "loc_kld", *terms):
        torch.testing.assert_close(fast[k], plain[k].detach(), rtol=1e-10, atol=1e-10)
    _assert_same(fast_grads, _grads(model), 1e-10)


TINY_RECIPE = """
kind: glitr
data: {num_frames: 3, img_size: 32}
model: {embed_dim: 16, depth: 1, num_heads: 2, patch_size: 8, glimpse_size: 2, temporal_dim: 32,
        temporal_depth: 1, temporal_heads: 2}
optim: {batch_size: 2}
train: {device: cpu}
"""


def test_bench_command_prints_and_writes_figures(tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_RECIPE)
    out = tmp_path / "bench.json"
    argv = ["bench", str(recipe), "--repeats", "2", "--warmup", "1", "--online-batch", "3", "--num-classes", "4"]
    code, stdout, stderr = run_cli([*argv, "--json", str(out), "optim.batch_size=3"], monkeypatch, capsys)
    assert code == 0, stderr
    assert "student_train_clips_per_s" in stdout
    result = json.loads(out.read_text())
    assert result["batch_size"] == 3 and result["device"].startswith("CPU")
    names = {
        "student_train_clips_per_s",
        "student_train_clips_per_s_baseline",
        "teacher_train_clips_per_s",
        "teacher_train_clips_per_s_baseline",
        "eval_clips_per_s",
        "online_ms_per_frame_b1",
        "online_frames_per_s_b3",
        "student_train_speedup",
    }
    assert names <= set(result["results"])
    assert all(fig["min"] > 0 for fig in result["results"].values())
    assert 0 < result["flops"]["backbone_per_glimpse"] < result["flops"]["backbone_per_full_frame"]
    # the online step's arithmetic; the exported step in ONNX Runtime, when the export packages are installed
    # (they are in dev), with its memory bound, and int8's agreement with the float step
    assert result["flops"]["online_step"] > 0 and result["results"]["online_gflop_per_s_b1"]["median"] > 0
    names = ("ms_per_frame_b1", "b1_speedup", "gflop_per_s_b1", "memory_bound_ms_b1", "over_memory_bound_b1")
    onnx = {f"online_{name}_{kind}" for name in names for kind in ("onnx", "onnx_int8")}
    assert (onnx <= set(result["results"])) == onnx_runtime_available()
    if onnx_runtime_available():
        weights = result["online_weight_bytes"]
        assert weights["onnx_int8"] < weights["onnx"] / 2 and abs(weights["onnx"] / weights["pytorch"] - 1) < 0.05
        assert result["online_agreement"]["onnx_max_abs_prob_diff"] < 1e-4
        assert 0 <= result["online_agreement"]["int8_top1_agreement"] <= 1
        assert any(name.startswith("memory_read_gb_per_s_") for name in result["results"])
        assert "online_weights_read_per_frame_onnx_int8" in stdout


@pytest.mark.slow
def test_compiled_modules_compute_the_plain_path():
    """`GliTr.compile()` (T_f, T_c, T_l through torch.compile) keeps the losses and gradients."""
    student, teacher = tiny_glitr(0), tiny_glitr(1)
    x, y = clips(smooth=True), torch.tensor([1, 3])
    student.set_fused_attn(False)
    plain = PlainStudentObjective(student, teacher).train()(x, y)
    plain["loss"].backward()
    plain_grads = _grads(student)
    student.zero_grad(set_to_none=True)
    student.set_fused_attn(True)
    student.compile()
    fast = StudentObjective(student, teacher).train()(x, y)
    fast["loss"].backward()
    for k in ("loss", "cls", "spatial", "temporal"):
        torch.testing.assert_close(fast[k], plain[k].detach(), rtol=1e-4, atol=1e-4)
    _assert_same(_grads(student), plain_grads, 1e-4)
    assert set(student.state_dict()) == set(tiny_glitr(0).state_dict())  # names unchanged by compiling


@pytest.mark.parametrize("modes", [[], ["data.augment_on=device"], ["data.augment_on=device", "data.decode_on=device"]])
def test_bench_times_training_from_the_dataset_and_its_stages(toy_data, tmp_path, monkeypatch, capsys, modes):
    """`glitr bench --data`: end-to-end training from the prepared dataset next to the synthetic figure, and
    the time of each stage, wherever the recipe decodes and transforms."""
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_RECIPE)
    out = tmp_path / "bench.json"
    argv = ["bench", recipe, "--data", "--batch-size", "2", "--repeats", "1", "--warmup", "0", "--no-baseline"]
    argv += ["--online-batch", "2", "--json", out, f"data.root={toy_data / 'toy'}", "data.workers=1", *modes]
    code, stdout, stderr = run_cli([str(a) for a in argv], monkeypatch, capsys)
    assert code == 0, stderr
    result = json.loads(out.read_text())
    names = {"data_decode_ms_per_clip", "data_transform_ms_per_clip", "data_transfer_ms_per_clip"}
    for kind in ("student", "teacher"):
        names |= {f"{kind}_train_clips_per_s_data", f"{kind}_train_data_fraction", f"{kind}_train_step_ms_per_clip"}
    assert names <= set(result["results"]) and "data_decode_ms_per_clip" in stdout
    assert all(result["results"][name]["median"] > 0 for name in names)
    on = {"decode_on": "device" if "data.decode_on=device" in modes else "loader"}
    on["augment_on"] = "device" if modes else "loader"
    assert result["data"] == {**result["data"], **on, "workers": 1, "clips": 16, "pin_memory": False}
    decoded = "decoded in the training process" if on["decode_on"] == "device" else "decoded in 1 loader worker,"
    assert decoded in " ".join(stdout.split())


@pytest.mark.parametrize("kind", ["student", "teacher"])
def test_bench_times_the_training_step_and_its_plain_path_makes_the_same_update(tmp_path, kind):
    """What bench times is one optimiser step of the trainer's `TrainStep` (schedule, AdamW, update);
    its plain yardstick is the same step over the reference path, and the two land on the same weights."""
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_RECIPE)
    rates = [f"optim.{m}.base=0.01" for m in ("backbone", "classifier", "locator")]
    # eps: AdamW's first update is lr * g / (|g| + eps); a large eps keeps it linear in g, so float noise
    # in gradients that are zero in exact arithmetic (the key bias) stays noise
    overrides = ["objective.label_smoothing=0.1", "model.drop_path=0", "optim.lr_batch=2", "optim.eps=1e-3", *rates]
    s = bench.setup(load_recipe(recipe, overrides), BenchSettings(batch_size=2, num_classes=4))
    model = s.objectives[kind].model
    start = copy.deepcopy(model.state_dict())
    s.step(kind, s.runtime)()
    fast = copy.deepcopy(model.state_dict())
    assert max((fast[k] - start[k]).abs().max() for k in start) > 5e-3, "the step did not update the weights"
    model.load_state_dict(start)
    set_fused_attention(s.objectives[kind], False)
    s.step(kind, s.runtime, plain=True)()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, fast[k], rtol=1e-5, atol=1e-6, msg=k)


def test_grad_checkpointing_lowers_the_activation_memory_bench_reports(tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_RECIPE)
    settings = BenchSettings(batch_size=2, num_classes=4, warmup=0, repeats=1, baseline=False)
    saved = {}
    for checkpointing in ("false", "true"):
        s = bench.setup(load_recipe(recipe, [f"train.grad_checkpointing={checkpointing}"]), settings)
        m = Measurements(0, 1, s.runtime.device)
        training(s, m, baseline=False)
        saved[checkpointing] = m.saved_mib
    for kind in ("student", "teacher"):
        assert saved["true"][f"{kind}_train_step"] < saved["false"][f"{kind}_train_step"], saved


def test_figures_timed_together_interleave_their_repeats():
    """Compared figures (eager, ONNX and int8 online steps) are timed in turns, one call of each per repeat,
    after each one's warm-up: a machine that slows down for a while slows all of them alike."""
    calls = []
    m = Measurements(1, 3, torch.device("cpu"))
    m.time_together({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 2, "ms/frame")
    assert calls == ["a", "b"] + ["a", "b"] * 3
    assert all(len(m.values[k][0]) == 3 and m.values[k][1] == "ms/frame" for k in "ab")
    assert all(v > 0 for k in "ab" for v in m.values[k][0])


def _sdpa_calls(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum("scaled_dot_product" in e.name for e in prof.events())


def test_the_plain_baseline_runs_no_fused_attention(tmp_path):
    """The yardstick is the original's algorithm everywhere, the student's frozen teacher included: no
    scaled_dot_product_attention in a plain step, and the recipe's attention back afterwards."""
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_RECIPE)
    s = bench.setup(load_recipe(recipe), BenchSettings(batch_size=2, num_classes=4, warmup=0, repeats=1))
    training(s, Measurements(0, 1, s.runtime.device), baseline=True)
    for kind in ("student", "teacher"):
        assert _sdpa_calls(s.step(kind, s.runtime)) > 0, "the recipe's step uses fused attention"
        set_fused_attention(s.objectives[kind], False)
        assert _sdpa_calls(s.step(kind, s.runtime, plain=True)) == 0, kind


def test_derived_figures_from_known_timings():
    values = {
        "student_train_clips_per_s": ([2.0, 4.0, 3.0], "clips/s"),
        "student_train_clips_per_s_baseline": ([1.0, 2.0, 1.5], "clips/s"),
        "student_train_clips_per_s_data": ([1.5, 3.0], "clips/s"),
        "teacher_train_clips_per_s": ([5.0], "clips/s"),
        "online_ms_per_frame_b1": ([10.0, 12.0, 8.0], "ms/frame"),
        "online_ms_per_frame_b1_onnx_int8": ([5.0, 4.0], "ms/frame"),
    }
    out = derived(values, {"student_train_step": 100, "teacher_train_step": 60}, {"student": 2, "teacher": 3}, 400.0)
    assert out["student_train_speedup"] == {"median": 2.0, "min": 4 / 3, "max": 8 / 3, "unit": "x"}
    assert out["student_train_flop_per_s"] == {"median": 150.0, "min": 100.0, "max": 200.0, "unit": "FLOP/s"}
    assert out["student_train_fraction_of_peak"]["max"] == 0.5
    assert out["teacher_train_flop_per_s"]["median"] == 100.0 and "teacher_train_speedup" not in out
    assert out["student_train_step_ms_per_clip"] == {"median": 1000 / 3, "min": 250.0, "max": 500.0, "unit": "ms/clip"}
    assert out["student_train_data_fraction"] == {"median": 0.75, "min": 0.5, "max": 1.0, "unit": "of synthetic"}
    assert out["online_b1_speedup_onnx_int8"] == {"median": 2.25, "min": 2.0, "max": 2.5, "unit": "x"}
    assert "online_b1_speedup_onnx" not in out and "teacher_train_data_fraction" not in out


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="the resident set's peak is read on Linux")
def test_each_figure_reports_its_own_peak_memory():
    """A figure measured after a large allocation does not inherit its peak."""
    with peak_memory(torch.device("cpu")) as big:
        with mmap.mmap(-1, 64 * 2**20) as block:  # 64 MiB, touched, given back to the system on close
            block.write(b"x" * len(block))
    with peak_memory(torch.device("cpu")) as small:
        torch.ones(16, dtype=torch.uint8)
    assert big["mib"] > small["mib"] + 32, (big, small)
