"""GPU paths: CUDA-graph online inference, bf16 training, fused AdamW, compile, NCCL, nvJPEG decoding and
the training transform on the GPU, `glitr bench`.

Skipped where no CUDA device is present (CI); run on a GPU machine with
`python -m pytest -q tests/test_cuda.py`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, read_metrics, tiny_recipe
from data_helpers import make_frames, write_jpeg
from model_helpers import clips, tiny_glitr

from glitr_cli.data.dataset import VideoFolderDataset
from glitr_cli.data.transforms import clip_train_transform
from glitr_cli.engine.augment import DeviceAugment
from glitr_cli.engine.graphs import GraphedStep
from glitr_cli.engine.trainer import Trainer
from glitr_cli.model import OnlinePredictor, StudentObjective
from glitr_cli.model.reference import PlainStudentObjective
from glitr_cli.recipe import load_recipe

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _exact_float32():
    """Plain float32 matmuls (no TF32), so float32 comparisons mean what they say."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _env() -> dict[str, str]:
    """This checkout first on the path, keeping what the caller's PYTHONPATH already holds."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def _run(predictor: OnlinePredictor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    predictor.reset(x.shape[0])
    steps = [predictor.step(x[:, t]) for t in range(x.shape[1])]
    return torch.stack([s.location for s in steps], 1), torch.stack([s.logits for s in steps], 1)


def test_cuda_graph_predictor_matches_eager_steps_and_the_batched_student():
    model = tiny_glitr().cuda()
    eager = OnlinePredictor(model, batch_size=2, cuda_graphs=False)
    graphs = OnlinePredictor(model, batch_size=2, cuda_graphs=True)
    for seed in range(3):  # every stream after the first replays the same graphs
        x = clips(seed=seed, smooth=True).cuda()
        locs, logits = _run(graphs, x)
        ref_locs, ref_logits = _run(eager, x)
        torch.testing.assert_close(locs, ref_locs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            out = model.forward_student(x)
        torch.testing.assert_close(logits, out.logits, rtol=1e-4, atol=1e-4)
    one = clips(batch=1, seed=5, smooth=True).cuda()  # a new batch size captures again
    torch.testing.assert_close(_run(graphs, one)[1], _run(eager, one)[1], rtol=1e-5, atol=1e-5)


def _crops(frames: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """The pixels of `boxes` (B, 4) (x0, y0, x1, y1, end exclusive) of model inputs (B, 3, S, S), zeros outside."""
    pad = frames.shape[-1]
    padded = torch.nn.functional.pad(frames, (pad, pad, pad, pad))
    rows = [padded[i, :, y0 + pad : y1 + pad, x0 + pad : x1 + pad] for i, (x0, y0, x1, y1) in enumerate(boxes.tolist())]
    return torch.stack(rows)


def test_whole_frames_after_crops_go_on_from_the_streams_state():
    """The first whole-frame step after eager crop steps captures the graphs; the streams keep their
    state through the capture and continue as the eager predictor does."""
    model = tiny_glitr().cuda()
    x = clips(smooth=True).cuda()
    eager = OnlinePredictor(model, batch_size=2, cuda_graphs=False)
    graphs = OnlinePredictor(model, batch_size=2, cuda_graphs=True)
    for t in range(x.shape[1]):
        ref = eager.step(x[:, t])
        out = graphs.step(crop=_crops(x[:, t], graphs.next_box())) if t < 2 else graphs.step(x[:, t])
        torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.next_location, ref.next_location, rtol=1e-5, atol=1e-5)
    assert graphs.t == graphs.frames == x.shape[1]


def test_bf16_graph_predictor_stays_close_to_float32():
    model = tiny_glitr().cuda()
    x = clips(smooth=True).cuda()
    ref = _run(OnlinePredictor(model, batch_size=2), x)[1]
    bf16 = _run(OnlinePredictor(model, batch_size=2, amp_dtype=torch.bfloat16), x)[1]
    torch.testing.assert_close(bf16.float(), ref, rtol=0.05, atol=0.05)


def test_fused_attention_on_cuda_equals_the_plain_path():
    student, teacher = tiny_glitr(0).cuda(), tiny_glitr(1).cuda()
    x, y = clips(smooth=True).cuda(), torch.tensor([1, 3]).cuda()
    fast = StudentObjective(student, teacher).train()(x, y)
    student.set_fused_attn(False)
    plain = PlainStudentObjective(student, teacher).train()(x, y)
    for k in ("cls", "spatial", "temporal"):
        torch.testing.assert_close(fast[k], plain[k].detach(), rtol=1e-4, atol=1e-4)


def _train_losses(run) -> list[float]:
    return [r["loss"] for r in read_metrics(run) if r["split"] == "train"]


def _assert_losses_close(got: list[float], ref: list[float], first: float, rest: float) -> None:
    """The first step's loss (both runs start from the same weights on the same batch) within `first`,
    every later one (the runs' weights have drifted apart by then) within `rest`, relative."""
    assert len(got) == len(ref) > 1, (got, ref)
    assert got[0] == pytest.approx(ref[0], rel=first), (got, ref)
    assert got == pytest.approx(ref, rel=rest), (got, ref)


def test_bf16_training_with_fused_adamw_on_cuda(tmp_path, toy_data):
    """bf16 autocast with the fused AdamW trains as float32 with the plain AdamW does, teacher and student.

    bf16 keeps 8 bits of mantissa (relative rounding 2^-9, about 0.2 %) on the matmul inputs, whose
    float32 sums average that error down: the first loss, from the same weights on the same batch, is
    within 2 %. Later steps start from weights that drifted apart by at most a few learning-rate steps
    (Adam's step is about lr per weight, whatever the gradient's rounding): within 10 %. A wrong cast or
    a broken fused update (no update, a doubled one, a lost weight decay) moves the losses far more."""
    fast = ["train.device=cuda", "train.precision=bf16", "optim.fused=true"]
    ref = ["train.device=cuda", "train.precision=fp32", "optim.fused=false"]
    teacher_dir = tmp_path / "teacher"
    teacher = Trainer(tiny_recipe(tmp_path, toy_data, "teacher", f"output_dir={teacher_dir}", *fast))
    teacher.fit()
    Trainer(tiny_recipe(tmp_path, toy_data, "teacher", f"output_dir={tmp_path / 'teacher_fp32'}", *ref)).fit()
    from_teacher = f"objective.teacher={teacher_dir / 'checkpoints/last.pt'}"  # both students learn from it
    student_dir = tmp_path / "glitr"
    student = Trainer(tiny_recipe(tmp_path, toy_data, "glitr", f"output_dir={student_dir}", from_teacher, *fast))
    student.fit()
    Trainer(tiny_recipe(tmp_path, toy_data, "glitr", f"output_dir={tmp_path / 'glitr_fp32'}", from_teacher, *ref)).fit()
    for trainer, run in ((teacher, teacher_dir), (student, student_dir)):
        assert trainer.runtime.amp_dtype == torch.bfloat16
        assert trainer.train_step.optimizer.param_groups[0]["fused"] is True
        _assert_losses_close(_train_losses(run), _train_losses(run.with_name(f"{run.name}_fp32")), 0.02, 0.1)
        assert (run / "checkpoints/last.pt").exists()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_graphed_step_equals_the_eager_step(checkpointing):
    student, teacher = tiny_glitr(0).cuda(), tiny_glitr(1).cuda()
    student.set_grad_checkpointing(checkpointing)  # the recompute in backward is captured too
    objective = StudentObjective(student, teacher).train()

    def forward_backward(frames, target):
        out = objective(frames, target)
        out["loss"].backward()
        return out

    graphed = GraphedStep(forward_backward, student)
    for seed in range(3):  # replays with new inputs; gradients zeroed in place in between
        x, y = clips(seed=seed, smooth=True).cuda(), torch.tensor([seed % 4, 3]).cuda()
        student.zero_grad(set_to_none=False)
        got = {k: v.clone() for k, v in graphed(x, y).items()}
        got_grads = [p.grad.clone() for p in student.parameters()]
        student.zero_grad(set_to_none=False)
        ref = forward_backward(x, y)
        for k in ("loss", "cls", "spatial", "temporal", "logits"):
            torch.testing.assert_close(got[k], ref[k].detach(), rtol=1e-5, atol=1e-5)
        for a, p in zip(got_grads, student.parameters(), strict=True):
            torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-5)


def test_graphed_training_matches_eager_training(tmp_path, toy_data):
    """Also through a held T_l: the eager step leaves its losses out, the graph computes them and drops
    T_l's gradients."""
    same = ["train.device=cuda", "train.precision=fp32", "model.drop_path=0", "optim.epochs=2"]
    same += ["optim.locator.hold_epochs=1"]
    weights = {}
    for graphs in (False, True):
        out = tmp_path / f"graphs_{graphs}"
        recipe = tiny_recipe(tmp_path, toy_data, "teacher", f"output_dir={out}", f"train.cuda_graphs={graphs}", *same)
        trainer = Trainer(recipe)
        trainer.fit()
        assert (trainer.train_step.graphed is not None) == graphs
        weights[graphs] = trainer.model.state_dict()
    for k, v in weights[False].items():
        torch.testing.assert_close(weights[True][k], v, rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.slow
def test_compiled_training_on_cuda(tmp_path, toy_data):
    """`train.compile=true` trains as eager mode does. No drop path: compiled code draws its random numbers
    with its own generator. Inductor fuses and reorders the float32 sums (rounding of about 1e-6 per
    operation): the first loss within 1e-3 relative; Adam's steps carry that rounding into the weights,
    the later losses within 1e-2, still far below what a wrongly compiled graph (a lost gradient, a stale
    buffer) changes."""
    same = ["train.device=cuda", "train.precision=fp32", "model.drop_path=0"]
    losses = {}
    for compiled in (False, True):
        out = tmp_path / f"compile_{compiled}"
        recipe = tiny_recipe(tmp_path, toy_data, "teacher", f"output_dir={out}", f"train.compile={compiled}", *same)
        Trainer(recipe).fit()
        losses[compiled] = _train_losses(out)
    _assert_losses_close(losses[True], losses[False], 1e-3, 1e-2)


@pytest.mark.slow
def test_one_process_torchrun_with_nccl(tmp_path, toy_data):
    recipe_file = tmp_path / "tiny_teacher.yaml"
    tiny_recipe(tmp_path, toy_data, "teacher")  # writes recipe_file
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
        "-m", "glitr_cli", "train-teacher", str(recipe_file),
        f"data.root={toy_data / 'toy'}", f"output_dir={out}", "train.device=cuda",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-10000:]
    ckpt = torch.load(out / "checkpoints/last.pt", map_location="cpu", weights_only=True)
    assert ckpt["world_size"] == 1


def test_bench_on_cuda_reports_graphs_and_speedups(tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        "kind: glitr\ndata: {num_frames: 4, img_size: 64}\n"
        "model: {embed_dim: 64, depth: 2, num_heads: 2, glimpse_size: 2, temporal_depth: 1, temporal_heads: 2}\n"
        "optim: {batch_size: 4}\n"
    )
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "glitr_cli", "bench", str(recipe), "--repeats", "2", "--warmup", "1"]
    cmd += ["--online-batch", "3", "--num-classes", "4", "--json", str(out), "--teacher-batch-size", "2"]
    cmd += ["train.cuda_graphs=true"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["precision"] == "bf16" and result["teacher_batch_size"] == 2 and not result["failures"]
    assert result["cuda_graphs"]
    for name in ("online_ms_per_frame_b1", "online_ms_per_frame_b1_no_graphs", "student_train_speedup"):
        assert result["results"][name]["median"] > 0


def _prepared(root, videos: int, frames: int, h: int, w: int):
    """A prepared dataset of `videos` clips of real JPEG frames (h x w, 4:2:0 as prepare-data writes them)."""
    for v in range(videos):
        for i, frame in enumerate(make_frames(frames, h, w, seed=v), start=1):
            write_jpeg(root / "frames" / f"v{v}" / f"{i:06d}.jpg", frame)
    (root / "train_videofolder.txt").write_text("".join(f"v{v} {frames} {v % 2}\n" for v in range(videos)))
    (root / "category.txt").write_text("a\nb\n")
    return root


def test_decoding_and_transforming_on_the_gpu_match_the_cpu(tmp_path):
    """`data.decode_on=device` on a GPU: nvJPEG decodes what libjpeg-turbo decodes on the CPU (up to the
    decoders' own rounding), and the training transform drawn from the same seeds gives the CPU's clips."""
    ds = VideoFolderDataset(_prepared(tmp_path, 4, 8, 256, 320), "train", num_frames=8, train=True, encoded=True)
    items = [ds[i][0] for i in range(4)]
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    on_cpu, on_gpu = ds.decode(items, cpu), ds.decode(items, gpu)
    assert on_gpu[0].device.type == "cuda" and on_gpu[0].shape == (8, 3, 256, 320)
    for a, b in zip(on_cpu, on_gpu, strict=True):  # nvJPEG's IDCT and chroma upsampling are not libjpeg-turbo's
        diff = (a.int() - b.cpu().int()).abs()
        assert diff.float().mean() < 1.0 and diff.max() <= 16, (diff.float().mean(), diff.max())
    assert int(ds.damage[:, 0].sum()) == 0
    transform = clip_train_transform(load_recipe("ssv2").data)  # RandAugment m7 n4, crop; no random erasing
    seeds = torch.arange(4) + 1000
    ref = DeviceAugment(transform, cpu)(on_cpu, seeds)
    out = DeviceAugment(transform, gpu)(on_cpu, seeds).cpu()  # the same uint8 clips, transformed on the GPU
    assert out.shape == ref.shape == (4, 8, 3, 224, 224)
    # float noise; where it moves a resampled pixel across a rounding step, one grey level (0.018 normalised)
    close = (out - ref).abs() <= 0.02
    assert close.float().mean() > 0.999, close.float().mean()
    whole = DeviceAugment(transform, gpu, ds.decode)(items, seeds).cpu()  # nvJPEG + transform on the GPU
    assert (whole - ref).abs().mean() < 0.05


def test_a_file_nvjpeg_cannot_decode_is_read_as_the_loader_reads_it(tmp_path):
    """A corrupt or missing file fails the batched nvJPEG call; its clip is then read on the CPU the loader's
    way (replaced by the nearest readable frame, counted) and the GPU goes on decoding."""
    root = _prepared(tmp_path, 3, 4, 64, 80)
    path = root / "frames/v1/000002.jpg"
    path.write_bytes(path.read_bytes()[:300])  # truncated
    (root / "frames/v2/000003.jpg").unlink()  # missing
    ds = VideoFolderDataset(root, "train", num_frames=4, train=False, encoded=True)
    loader = VideoFolderDataset(root, "train", num_frames=4, train=False)
    items = [ds[i][0] for i in range(3)]
    clips = ds.decode(items, torch.device("cuda"))
    assert [c.device.type for c in clips] == ["cuda"] * 3
    for i in (1, 2):
        assert torch.equal(clips[i].cpu(), loader[i][0])
    assert ds.damage.tolist() == loader.damage.tolist() == [[0, 0], [1, 0], [1, 0]]
    again = ds.decode(items[:1], torch.device("cuda"))[0]  # the context survived the failed call
    assert torch.equal(again, clips[0])


def test_bench_data_on_cuda_decodes_and_transforms_on_the_gpu(tmp_path, toy_data):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        "kind: glitr\ndata: {num_frames: 4, img_size: 64, resize: 64}\n"
        "model: {embed_dim: 64, depth: 2, num_heads: 2, glimpse_size: 2, temporal_depth: 1, temporal_heads: 2}\n"
        "optim: {batch_size: 4}\n"
    )
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "glitr_cli", "bench", str(recipe), "--data", "--repeats", "2", "--warmup", "1"]
    cmd += ["--no-baseline", "--online-batch", "3", "--json", str(out), f"data.root={toy_data / 'toy'}"]
    cmd += ["data.decode_on=device", "data.augment_on=device"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["data"]["pin_memory"] and result["data"]["workers"] >= 1 and not result["failures"]
    for kind in ("student", "teacher"):
        assert result["results"][f"{kind}_train_clips_per_s_data"]["median"] > 0
    assert result["results"]["data_decode_ms_per_clip"]["median"] > 0
