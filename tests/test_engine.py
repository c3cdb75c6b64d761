"""The engine's parts (optimiser groups, schedule, mixup, sampler) and the training loop itself."""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import REPO, assert_same_weights, held_glitr, model_weights, read_metrics, run_glitr, tiny_recipe
from PIL import Image

from glitr_cli import runtime
from glitr_cli.data.transforms import train_transform
from glitr_cli.engine.augment import DeviceAugment, collate_uint8_clips
from glitr_cli.engine.build import build_objective
from glitr_cli.engine.distributed import ResumableSampler, SeededDataset, ShardSampler
from glitr_cli.engine.loading import build_model
from glitr_cli.engine.metrics import plot_curves
from glitr_cli.engine.mixup import MixupCutmix, soft_targets
from glitr_cli.engine.optim import MODULES, GroupSchedule, build_optimizer, build_schedule, param_groups
from glitr_cli.engine.step import TrainStep
from glitr_cli.engine.trainer import PREEMPT_SIGNALS, Trainer
from glitr_cli.errors import PREEMPTED_EXIT_CODE, GlitrError
from glitr_cli.model import build_glitr
from glitr_cli.model.spatial import conv_stem
from glitr_cli.recipe import GroupLR, ModelConfig, load_recipe
from glitr_cli.runtime import auto_threads, auto_workers, available_cores

# ------------------------------------------------------------------------------------ optimiser


def tiny_model():
    return build_glitr(
        num_classes=5, num_frames=4, img_size=32, glimpse_size=2, embed_dim=32, depth=1, num_heads=2,
        patch_size=8, temporal_depth=1, temporal_heads=2,
    )  # fmt: skip


def test_param_groups_decay_every_parameter_as_the_original():
    model = tiny_model()
    groups = param_groups(model, weight_decay=0.05, exclude_from_decay=False)
    assert [(g["module"], g["weight_decay"]) for g in groups] == [(m, 0.05) for m in MODULES]  # one group a module
    assert sum(len(g["params"]) for g in groups) == sum(1 for _ in model.parameters())


def test_param_groups_one_schedule_per_module_and_no_decay_exclusions():
    model = tiny_model()
    groups = param_groups(model, weight_decay=0.05, exclude_from_decay=True)
    assert {g["module"] for g in groups} == {"backbone", "classifier", "locator"}
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(1 for _ in model.parameters())  # each param exactly once
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    decay = {names[id(p)] for g in groups if g["weight_decay"] == 0.05 for p in g["params"]}
    for must in ("backbone.cls_token", "backbone.pos_embed", "classifier.temporal_embed", "locator.init_loc"):
        assert must in no_decay
    assert all(n.endswith(("bias", "weight")) for n in no_decay if "norm" in n)
    assert not any(n.endswith(".bias") for n in decay)
    assert "backbone.blocks.0.attn.qkv.weight" in decay and "classifier.head.weight" in decay
    for g in groups:  # the module tag matches where the parameters live
        assert all(names[id(p)].startswith(g["module"] + ".") for p in g["params"])


def test_schedule_scales_warms_up_and_decays_per_iteration():
    sched = build_schedule(
        {
            "backbone": GroupLR(base=1e-5, floor=1e-7, warmup_epochs=0.0, warmup_start=1e-6),
            "classifier": GroupLR(base=1e-4, floor=1e-6, warmup_epochs=0.0, warmup_start=1e-6),
            "locator": GroupLR(base=1e-4, floor=1e-6, warmup_epochs=2.0, warmup_start=1e-6),
        },
        global_batch=64,
        lr_batch=128,
        steps_per_epoch=10,
        epochs=5,
    )
    first, last = sched.lrs(0), sched.lrs(50)  # the floor is reached when training ends
    assert first["backbone"] == pytest.approx(1e-5 * 64 / 128) and first["classifier"] == pytest.approx(5e-5)
    assert first["locator"] == pytest.approx(1e-6)  # warm-up starts low (not scaled)
    assert sched.lrs(10)["locator"] == pytest.approx(1e-6 + (5e-5 - 1e-6) * 10 / 20)
    assert sched.lrs(19)["locator"] == pytest.approx(1e-6 + (5e-5 - 1e-6) * 19 / 20)
    assert sched.lrs(20)["locator"] == sched.lrs(20)["classifier"]  # warm-up done: on the whole run's cosine
    assert last["backbone"] == pytest.approx(1e-7, rel=0.01) and last["locator"] == pytest.approx(1e-6, rel=0.02)
    lrs = [sched.lrs(i)["backbone"] for i in range(50)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))  # cosine decays every iteration
    assert lrs[25] == pytest.approx(1e-7 + 0.5 * (5e-6 - 1e-7) * (1 + math.cos(math.pi * 25 / 50)))
    g = GroupSchedule(base=1.0, floor=0.0, warmup=0, warmup_start=0.0, total=4)
    assert [g(i) for i in range(5)] == pytest.approx([1.0, 0.8535534, 0.5, 0.1464466, 0.0])


def test_a_held_module_starts_its_schedule_late():
    """hold_epochs: learning rate 0, then the warm-up and the cosine squeezed into what is left."""
    sched = build_schedule(
        {
            "backbone": GroupLR(base=1.0, floor=0.0, warmup_start=0.0),
            "classifier": GroupLR(base=1.0, floor=0.0, warmup_start=0.0),
            "locator": GroupLR(base=2.0, floor=0.1, warmup_epochs=1.0, warmup_start=0.0, hold_epochs=2.0),
        },
        global_batch=128,
        lr_batch=128,
        steps_per_epoch=4,
        epochs=5,
    )
    lrs = [sched.lrs(i)["locator"] for i in range(21)]
    assert lrs[:8] == [0.0] * 8  # held for 2 epochs
    assert lrs[8:12] == pytest.approx([0.0, 0.5, 1.0, 1.5])  # warm-up over 1 epoch
    plain = GroupSchedule(base=2.0, floor=0.1, warmup=0, warmup_start=0.0, total=12)
    assert lrs[12:] == pytest.approx([plain(i) for i in range(4, 13)])  # then the cosine of the last 3 epochs
    assert sched.lrs(0)["backbone"] == 1.0  # the other modules are not held
    assert sched.held(7) == {"locator"} and sched.held(8) == set()


def test_a_held_locator_gets_no_update_nor_state_and_leaving_out_its_losses_changes_nothing(tmp_path, toy_data):
    """While T_l is held, the eager teacher step leaves out the location losses (NaN in the log);
    it lands on the weights and AdamW state of the step that computes them and drops T_l's gradients
    (what a CUDA graph or DDP does), through the hold and after it."""
    recipe = tiny_recipe(
        tmp_path, toy_data, "teacher", "model.drop_path=0", "objective.mixup=0", "objective.cutmix=0",
        "optim.batch_size=2", "optim.epochs=2", "optim.locator.hold_epochs=1", "optim.locator.warmup_epochs=0",
    )  # fmt: skip
    rt = runtime.Runtime.from_recipe(recipe, device="cpu")
    torch.manual_seed(0)
    batches = [(torch.randn(2, 4, 3, 64, 64), torch.tensor([i % 8, (i + 3) % 8])) for i in range(4)]
    runs = {}
    for leave_out in (True, False):
        torch.manual_seed(1)
        objective = build_objective(recipe, [str(c) for c in range(8)], None)
        step = TrainStep(objective, rt, recipe.optim, steps_per_epoch=2)  # T_l held for steps 0 and 1
        assert step.leave_out_held
        step.leave_out_held = leave_out
        start = [p.detach().clone() for p in objective.model.locator.parameters()]

        def locator_moved() -> bool:
            return not all(map(torch.equal, start, objective.model.locator.parameters()))  # noqa: B023

        loc_mse: list[float] = []
        micro_batches = iter(batches)
        for i in range(4):
            step(micro_batches, lambda out, labels: loc_mse.append(out["loc_mse"].item()))  # noqa: B023
            held = [p for g in step.optimizer.param_groups if g["module"] == "locator" for p in g["params"]]
            if i < 2:
                assert not locator_moved() and not any(p in step.optimizer.state for p in held)
            else:
                assert all(p in step.optimizer.state for p in held)
        assert [math.isnan(x) for x in loc_mse] == [leave_out, leave_out, False, False]
        assert locator_moved()
        runs[leave_out] = (objective.model.state_dict(), step.optimizer.state_dict()["state"])
    assert_same_weights(runs[True][0], runs[False][0])
    for key, state in runs[True][1].items():
        for name, value in state.items():
            assert torch.equal(value, runs[False][1][key][name]), (key, name)


def test_schedule_sets_every_group_of_the_optimizer():
    model = tiny_model()
    opt = build_optimizer(model, weight_decay=0.05, exclude_from_decay=True, betas=(0.9, 0.999), eps=1e-8)
    sched = build_schedule(
        {m: GroupLR(base=base, floor=0.0, warmup_start=0.0) for m, base in zip(MODULES, (1.0, 2.0, 3.0), strict=True)},
        global_batch=128,
        lr_batch=128,
        steps_per_epoch=1,
        epochs=1,
    )
    sched.apply(opt, 0)
    assert {g["module"]: g["lr"] for g in opt.param_groups} == {"backbone": 1.0, "classifier": 2.0, "locator": 3.0}


# ---------------------------------------------------------------------------------------- mixup


def test_soft_targets_with_smoothing():
    t = soft_targets(torch.tensor([0, 2]), 4, smoothing=0.1)
    assert torch.allclose(t.sum(1), torch.ones(2))
    assert t[0, 0] == pytest.approx(0.9 + 0.025) and t[0, 1] == pytest.approx(0.025)


def test_cutmix_pastes_the_same_box_in_every_frame():
    torch.manual_seed(0)
    b, t, h, w = 4, 3, 16, 16
    clips = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1, 1).expand(b, t, 3, h, w).clone()
    labels = torch.tensor([0, 1, 2, 3])
    mix = MixupCutmix(num_classes=4, cutmix_alpha=1.0, label_smoothing=0.0)
    for _ in range(10):
        mixed, target = mix(clips, labels)
        pasted = mixed[0, :, 0] != 0  # clip 0 receives clip 3's pixels inside the box
        assert all(torch.equal(pasted[0], pasted[i]) for i in range(t))  # same box in every frame
        lam = 1 - pasted[0].float().mean().item()
        assert target[0, 0].item() == pytest.approx(lam) and target[0, 3].item() == pytest.approx(1 - lam)
        assert torch.allclose(target.sum(1), torch.ones(b))


def test_mixup_blends_clips_and_targets_alike():
    torch.manual_seed(0)
    clips = torch.stack([torch.zeros(2, 3, 8, 8), torch.ones(2, 3, 8, 8)])
    mix = MixupCutmix(num_classes=3, mixup_alpha=0.8, label_smoothing=0.1)
    mixed, target = mix(clips, torch.tensor([0, 1]))
    lam = 1 - mixed[0].mean().item()  # clip 0 is lam*0 + (1-lam)*1
    smooth = soft_targets(torch.tensor([0, 1]), 3, 0.1)
    assert torch.allclose(target[0], lam * smooth[0] + (1 - lam) * smooth[1], atol=1e-6)
    off = MixupCutmix(num_classes=3)
    same, hard = off(clips, torch.tensor([0, 1]))
    assert torch.equal(same, clips) and torch.equal(hard, soft_targets(torch.tensor([0, 1]), 3))


# -------------------------------------------------------------------------------------- sampling


def test_sampler_shards_and_resumes_mid_epoch():
    n, world = 23, 2
    shards = [list(ResumableSampler(n, rank=r, world_size=world, seed=1)) for r in range(world)]
    idx = [i for s in shards for i, _ in s]
    assert len(idx) == len(set(idx)) == 22  # disjoint; the odd tail is dropped
    seeds = [s for shard in shards for _, s in shard]
    assert len(set(seeds)) == len(seeds)
    sampler = ResumableSampler(n, rank=1, world_size=world, seed=1)
    sampler.set_epoch(3)
    full = list(sampler)
    sampler.set_epoch(3, skip=4)
    assert list(sampler) == full[4:] and len(sampler) == len(full) - 4
    sampler.set_epoch(4)
    assert [i for i, _ in sampler] != [i for i, _ in full]  # a new permutation each epoch
    assert list(ShardSampler(7, rank=1, world_size=3)) == [1, 4]


class _RandomItems(torch.utils.data.Dataset):
    def __len__(self):
        return 5

    def __getitem__(self, i):
        return torch.rand(()).item(), random.random(), np.random.rand()


def test_seeded_items_do_not_depend_on_or_disturb_the_global_generators():
    data = SeededDataset(_RandomItems())
    torch.manual_seed(0)
    a = data[(2, 1234)]
    before = torch.rand(1)
    torch.manual_seed(0)
    torch.rand(5)  # a different global state
    b = data[(2, 1234)]
    assert a == b and data[(2, 99)] != a
    torch.manual_seed(0)
    data[(2, 1234)]
    assert torch.equal(torch.rand(1), before)  # the caller's generator was put back


# ------------------------------------------------------------------------------------ training

OVERFIT = [
    "objective.mixup=0",
    "objective.cutmix=0",
    "objective.label_smoothing=0",
    "data.randaug_n=0",
    "data.scale=[1.0, 1.0]",
    "data.ratio=[1.0, 1.0]",
    "model.drop_path=0",
    "optim.batch_size=16",  # the whole train split in one batch
    "optim.epochs=25",
    "optim.backbone.base=1e-2",
    "optim.classifier.base=1e-2",
    "optim.locator.base=1e-2",
    "optim.locator.warmup_epochs=0",
    "train.eval_every=0",
    "train.checkpoint_every=0",
]


def test_loss_goes_down_on_a_small_batch(tmp_path, toy_data):
    Trainer(tiny_recipe(tmp_path, toy_data, "teacher", f"output_dir={tmp_path / 'run'}", *OVERFIT)).fit()
    records = [r for r in read_metrics(tmp_path / "run") if r["split"] == "train"]
    first, last = records[0], records[-1]
    assert last["cls"] < 0.6 * first["cls"]
    assert last["top1"][-1] == 1.0  # the batch is learnt by heart
    assert set(last["lr"]) == {"backbone", "classifier", "locator"} and last["clips_per_s"] > 0
    assert len(last["top1"]) == 4  # accuracy at every step t


def test_metrics_are_strict_json_and_every_validation_redraws_the_curves(tmp_path, toy_data):
    """The location losses left out while T_l is held are written as null, not NaN (which strict JSON
    parsers refuse); curves.png in the run directory is redrawn from metrics.jsonl after each validation."""
    run = tmp_path / "run"
    held = ("optim.locator.hold_epochs=1", "optim.locator.warmup_epochs=0", "train.checkpoint_every=0")
    trainer = Trainer(tiny_recipe(tmp_path, toy_data, "teacher", f"output_dir={run}", "optim.epochs=1", *held))
    trainer.fit()

    def no_constants(name: str):
        raise AssertionError(f"metrics.jsonl holds {name}")

    lines = (run / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=no_constants) for line in lines]
    train = [r for r in records if r["split"] == "train"]
    assert len(train) == 4 and all(r["loc_mse"] is None and r["loc_kld"] is None for r in train)
    assert all(math.isfinite(r["cls"]) for r in train)
    first = (run / "curves.png").read_bytes()
    assert Image.open(run / "curves.png").size == (1000, 1000)  # a third row: where the glimpses went

    Trainer(load_recipe(run / "recipe.yaml", ["optim.epochs=2"])).fit()  # one more epoch: T_l learns
    train = [r for r in read_metrics(run) if r["split"] == "train"]
    assert len(train) == 8 and all(isinstance(r["loc_mse"], float) for r in train[4:])
    assert (run / "curves.png").read_bytes() != first
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "curves.png", "metrics.jsonl", "recipe.yaml"]
    plot_curves([], tmp_path / "empty.png")  # no record yet (before the first epoch ends): empty axes
    assert Image.open(tmp_path / "empty.png").size == (1000, 700)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, toy_data):
    """The reference: the tiny teacher trained for 2 epochs (8 steps) without a stop."""
    out = tmp_path_factory.mktemp("uninterrupted")
    trainer = Trainer(tiny_recipe(out, toy_data, "teacher", f"output_dir={out / 'run'}"))
    trainer.fit()
    return out / "run", trainer


def test_interrupted_run_resumes_bit_identically(tmp_path, toy_data, uninterrupted):
    ref_dir, ref = uninterrupted
    out = f"output_dir={tmp_path / 'run'}"
    # stop after step 7; the newest checkpoint is step 6 (mid-epoch 2), so step 7 is lost and redone.
    # Data-loader workers differ from the reference: augmentation is seeded per clip, not per worker.
    first = Trainer(tiny_recipe(tmp_path, toy_data, "teacher", out, "data.workers=2"))
    children = set(multiprocessing.active_children())
    first.fit(max_steps=7)
    assert first.step == 7 and (tmp_path / "run/checkpoints/step_00000006.pt").is_file()
    assert set(multiprocessing.active_children()) == children  # fit ended its loader workers
    second = Trainer(tiny_recipe(tmp_path, toy_data, "teacher", out))  # found checkpoints/last.pt by itself
    second.fit()
    assert second.step == ref.step == 8
    assert_same_weights(
        model_weights(tmp_path / "run/checkpoints/last.pt"), model_weights(ref_dir / "checkpoints/last.pt")
    )
    opt = second.train_step.optimizer.state_dict()["state"]
    ref_opt = ref.train_step.optimizer.state_dict()["state"]
    assert all(torch.equal(opt[i]["exp_avg_sq"], ref_opt[i]["exp_avg_sq"]) for i in ref_opt)
    steps = [r["step"] for r in read_metrics(tmp_path / "run") if r["split"] == "train"]
    assert steps == list(range(1, 9))  # the redone step is logged once
    kept = sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir())
    assert kept == ["last.pt", "step_00000006.pt", "step_00000008.pt"]  # keep_last: 2


def test_saved_recipe_reproduces_the_run(tmp_path, uninterrupted):
    ref_dir, _ = uninterrupted
    Trainer(load_recipe(ref_dir / "recipe.yaml", [f"output_dir={tmp_path / 'again'}"])).fit()
    assert_same_weights(
        model_weights(tmp_path / "again/checkpoints/last.pt"), model_weights(ref_dir / "checkpoints/last.pt")
    )


def test_finished_run_is_not_trained_again(tmp_path, uninterrupted):
    ref_dir, _ = uninterrupted
    trainer = Trainer(load_recipe(ref_dir / "recipe.yaml"))
    assert trainer.fit() is None and trainer.step == 8


def test_a_finished_run_leaves_the_signal_handlers_as_it_found_them(uninterrupted):
    """`glitr demo` fits finished runs in the same process: afterwards SIGTERM must still end it."""
    ref_dir, _ = uninterrupted
    before = {signum: signal.getsignal(signum) for signum in PREEMPT_SIGNALS}
    try:
        for _ in range(2):
            assert Trainer(load_recipe(ref_dir / "recipe.yaml")).fit() is None
            assert {signum: signal.getsignal(signum) for signum in PREEMPT_SIGNALS} == before
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


@pytest.mark.slow
def test_sigusr1_saves_the_step_and_the_rerun_ends_as_if_never_stopped(tmp_path, toy_data, uninterrupted):
    """SIGUSR1 (what SLURM's --signal sends ahead of the time limit) to a `glitr train-teacher` process."""
    ref_dir, _ = uninterrupted
    held, gate = held_glitr(tmp_path, 5)
    tiny_recipe(tmp_path, toy_data, "teacher")  # writes tmp_path/tiny_teacher.yaml
    args = ["train-teacher", str(tmp_path / "tiny_teacher.yaml"), f"data.root={toy_data / 'toy'}"]
    args.append(f"output_dir={tmp_path / 'run'}")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, *held, *args], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (gate / "held0").exists() and time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it could be stopped"
        time.sleep(0.02)
    proc.send_signal(signal.SIGUSR1)
    (gate / "sent").touch()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_CODE, err
    assert "stopped by SIGUSR1 at step 5" in err and "Traceback" not in err, err
    ckpts = tmp_path / "run/checkpoints"
    assert (ckpts / "last.pt").samefile(ckpts / "step_00000005.pt")

    done = run_glitr(*args, cwd=tmp_path)
    assert done.returncode == 0 and "resumed from" in done.stderr and "step 5)" in done.stderr, done.stderr
    assert_same_weights(model_weights(ckpts / "last.pt"), model_weights(ref_dir / "checkpoints/last.pt"))


def test_student_resumes_bit_identically_and_learns_from_its_teacher(tmp_path, toy_data, uninterrupted):
    ref_dir, _ = uninterrupted
    teacher = f"objective.teacher={ref_dir / 'checkpoints/last.pt'}"
    full = Trainer(tiny_recipe(tmp_path, toy_data, "glitr", teacher, f"output_dir={tmp_path / 'a'}"))
    full.fit()
    part = Trainer(tiny_recipe(tmp_path, toy_data, "glitr", teacher, f"output_dir={tmp_path / 'b'}"))
    part.fit(max_steps=5)  # newest checkpoint: step 4, the end of epoch 1
    Trainer(tiny_recipe(tmp_path, toy_data, "glitr", teacher, f"output_dir={tmp_path / 'b'}")).fit()
    assert_same_weights(
        model_weights(tmp_path / "b/checkpoints/last.pt"), model_weights(tmp_path / "a/checkpoints/last.pt")
    )
    train = [r for r in read_metrics(tmp_path / "a") if r["split"] == "train"]
    assert {"cls", "spatial", "temporal"} <= set(train[0])
    # the student starts from its teacher's weights and keeps the frozen teacher out of its checkpoint
    assert not any(k.startswith("teacher.") for k in model_weights(tmp_path / "a/checkpoints/last.pt"))


def test_gradient_accumulation_matches_one_big_batch(tmp_path, toy_data):
    # no mixup pairs or drop-path draws, which depend on how a batch is split
    common = ["objective.mixup=0", "objective.cutmix=0", "model.drop_path=0", "optim.epochs=1", "train.eval_every=0"]
    one = Trainer(tiny_recipe(tmp_path, toy_data, "teacher", f"output_dir={tmp_path / 'one'}", *common))
    one.fit()
    acc = Trainer(
        tiny_recipe(tmp_path, toy_data, "teacher", f"output_dir={tmp_path / 'acc'}", *common, "optim.accum_steps=2")
    )
    acc.fit()
    assert acc.micro_batch == 2 and one.micro_batch == 4 and acc.step == one.step == 4
    a, b = model_weights(tmp_path / "one/checkpoints/last.pt"), model_weights(tmp_path / "acc/checkpoints/last.pt")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=2e-5), k

    # stopped at step 3 of 4 (the periodic checkpoint) and resumed with accumulation (the README's
    # advice for out-of-memory): the same global batch, so the same clips at the same steps
    switched = [f"output_dir={tmp_path / 'switched'}", *common]
    Trainer(tiny_recipe(tmp_path, toy_data, "teacher", *switched)).fit(max_steps=3)
    resumed = Trainer(tiny_recipe(tmp_path, toy_data, "teacher", *switched, "optim.accum_steps=2"))
    resumed.fit()
    assert resumed.step == 4
    assert [r["step"] for r in read_metrics(tmp_path / "switched") if r["split"] == "train"] == [1, 2, 3, 4]
    c = model_weights(tmp_path / "switched/checkpoints/last.pt")
    for k in a:
        assert torch.allclose(a[k], c[k], atol=2e-5), k


EXACT_STEP = ["model.drop_path=0", "objective.mixup=0", "objective.cutmix=0"]  # no draws: a step is its batch's


def step_on(recipe, rt: runtime.Runtime) -> TrainStep:
    """A `TrainStep` of the tiny teacher in `recipe`, from the same initial weights every time."""
    torch.manual_seed(1)
    return TrainStep(build_objective(recipe, [str(c) for c in range(8)], None), rt, recipe.optim, steps_per_epoch=4)


def random_batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    return [(torch.randn(4, 4, 3, 64, 64), torch.tensor([0, 1, 2, 3])) for _ in range(n)]


def test_clipping_scales_the_gradients_down_to_the_largest_norm_and_logs_the_norm_before(tmp_path, toy_data):
    """optim.clip_grad: AdamW's first moment after one step is (1 - beta1) x the gradient it was given."""
    (batch,) = random_batches(1)
    given = {}
    for clip in (1e9, 1e-3):  # never clips, always clips
        recipe = tiny_recipe(tmp_path, toy_data, "teacher", *EXACT_STEP, f"optim.clip_grad={clip}")
        step = step_on(recipe, runtime.Runtime.from_recipe(recipe, device="cpu"))
        norm = step(iter([batch]))["grad_norm"]
        beta1 = recipe.optim.betas[0]
        grads = [state["exp_avg"] / (1 - beta1) for state in step.optimizer.state.values()]
        given[clip] = norm, grads
    (norm, grads), (clipped_norm, clipped) = given[1e9], given[1e-3]
    assert norm == pytest.approx(torch.stack([g.norm() for g in grads]).norm().item(), rel=1e-5)
    assert clipped_norm == pytest.approx(norm, rel=1e-6) and norm > 1  # the norm before clipping
    assert torch.stack([g.norm() for g in clipped]).norm().item() == pytest.approx(1e-3, rel=1e-4)
    for g, c in zip(grads, clipped, strict=True):
        assert torch.allclose(c, g * (1e-3 / norm), rtol=1e-4, atol=1e-12)

    run = tmp_path / "run"
    recipe = tiny_recipe(tmp_path, toy_data, "teacher", f"output_dir={run}", "optim.epochs=1", "optim.clip_grad=1e-3")
    Trainer(recipe).fit()
    train = [r for r in read_metrics(run) if r["split"] == "train"]
    assert len(train) == 4 and all(r["grad_norm"] > 1e-3 for r in train)


def test_fp16_loss_scaling_skips_the_steps_that_overflow_and_a_checkpoint_keeps_the_scale(tmp_path, toy_data):
    """train.precision=fp16 runs on a GPU (a CPU trains in fp32): autocast to float16 and a
    GradScaler. A CPU runs both, so the fp16 step runs here: a step whose scaled gradients overflow
    float16 changes no weight and halves the scale; the others are clipped on the unscaled
    gradients; a run resumed from a checkpoint goes on with the scale it had."""
    recipe = tiny_recipe(tmp_path, toy_data, "teacher", *EXACT_STEP, "train.precision=fp16", "optim.clip_grad=1e3")
    cpu = runtime.Runtime.from_recipe(recipe, device="cpu")
    assert cpu.precision == "fp32" and not step_on(recipe, cpu).scaler.is_enabled()  # what `glitr` runs on a CPU
    fp16 = dataclasses.replace(cpu, precision="fp16")
    batches = random_batches(6)

    whole = step_on(recipe, fp16)
    scale = whole.scaler.get_scale()
    outcomes = []
    for i, batch in enumerate(batches):
        before = [p.detach().clone() for p in whole.model.parameters()]
        norm = whole(iter([batch]))["grad_norm"]
        moved = not all(map(torch.equal, before, whole.model.parameters()))
        outcomes.append(moved)
        assert moved == math.isfinite(norm), i
        assert whole.scaler.get_scale() == (scale if moved else scale / 2), i
        if moved and outcomes.count(True) == 1:  # the first update: from the initial weights, as fp32's
            fp32_norm = step_on(recipe, cpu)(iter([batch]))["grad_norm"]
            assert norm == pytest.approx(fp32_norm, rel=0.05)  # not `scale` times larger
        scale = whole.scaler.get_scale()
    assert outcomes[0] is False and outcomes[-1] is True  # the initial scale overflows here

    part = step_on(recipe, fp16)
    micro_batches = iter(batches)
    for _ in range(3):
        part(micro_batches)
    torch.save({"model": part.model.state_dict(), **part.state_dict()}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert saved["scaler"]["scale"] < 2.0**16
    resumed = step_on(recipe, fp16)
    resumed.model.load_state_dict(saved["model"])
    resumed.load_state_dict(saved)
    for _ in range(3):
        resumed(micro_batches)
    assert resumed.scaler.get_scale() == whole.scaler.get_scale()
    assert_same_weights(resumed.model.state_dict(), whole.model.state_dict())


def test_batch_not_divisible_is_a_clear_error(tmp_path, toy_data):
    trainer = Trainer(tiny_recipe(tmp_path, toy_data, "teacher", "optim.batch_size=6", "optim.accum_steps=4"))
    with pytest.raises(
        GlitrError, match=r"optim.batch_size=6 is not divisible by 1 process\(es\) x optim.accum_steps=4"
    ):
        trainer.setup()


def test_conv_stem_reads_frames_and_glimpses_and_keeps_the_signal():

    cfg = ModelConfig(
        embed_dim=32, depth=1, num_heads=2, temporal_depth=1, temporal_heads=2, glimpse_size=2, stem="conv"
    )
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=5, num_frames=3, img_size=64)
    assert isinstance(model.backbone.patch_embed.proj, torch.nn.Sequential)  # 4 stride-2 convs: 16-px patches
    clips = torch.randn(6, 3, 3, 64, 64)
    teacher, student = model.forward_teacher(clips), model.forward_student(clips)
    assert teacher.logits.shape == student.logits.shape == (6, 3, 5)
    # the frame, not only the position embeddings, shapes the features from the first step on
    assert teacher.feat.std(0).mean() > 0.05
    again = build_model(cfg, num_classes=5, num_frames=3, img_size=64)
    again.load_state_dict(model.state_dict())  # the same layout: checkpoints rebuild it
    odd = ModelConfig(embed_dim=32, depth=1, num_heads=2, patch_size=12, glimpse_size=2, temporal_heads=2, stem="conv")
    with pytest.raises(GlitrError, match="power-of-two patch size, got 12"):
        build_model(odd, num_classes=2, num_frames=2, img_size=48)


def test_conv_stem_on_channels_last_computes_what_the_plain_stem_does():
    torch.manual_seed(0)
    stem = conv_stem(32, 16)
    plain = torch.nn.Sequential(*stem)  # the same layers on the default memory layout
    for side in (64, 32):  # frames and glimpses
        images = torch.randn(5, 3, side, side, requires_grad=True)
        fast = stem(images)
        assert fast.is_contiguous(memory_format=torch.channels_last)
        (fast_grad,) = torch.autograd.grad(fast.square().sum(), images)
        ref = plain(images)
        (ref_grad,) = torch.autograd.grad(ref.square().sum(), images)
        torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fast_grad, ref_grad, rtol=1e-4, atol=1e-4)
        tokens = fast.flatten(2).transpose(1, 2)  # what SpatialEncoder reads: (N, h*w, D) without a copy
        assert tokens.is_contiguous()


def test_cpu_threads_leave_the_loader_workers_their_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = available_cores()
    assert auto_threads(1) == max(1, cores - 1)
    assert auto_threads(cores + 3) == 1
    assert auto_threads(0) == cores
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert auto_threads(1) == 3  # the user's choice stands


# in a fresh process: three teacher-objective steps at the toy geometry (their losses), then glibc's own
# account (mallinfo2) of five 64 MiB tensors allocated one after the other, each freed before the next:
# the bytes mapped apart from the heap while one is alive, the heap's size and its free bytes after it
_MALLOC_PROGRAM = """
import ctypes, json, sys
import torch
from glitr_cli.engine.build import build_objective
from glitr_cli.recipe import load_recipe
from glitr_cli.runtime import Runtime

class MallInfo2(ctypes.Structure):
    names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
    _fields_ = [(name, ctypes.c_size_t) for name in names.split()]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
recipe = load_recipe("toy_teacher", ["train.keep_freed_memory=" + sys.argv[1], "train.threads=1"])
Runtime.from_recipe(recipe, device="cpu").apply()
torch.manual_seed(0)
loss = build_objective(recipe, [str(i) for i in range(8)], None).loss_module.train()
frames, labels = torch.randn(2, 8, 3, 112, 112), torch.arange(2)
values = []
for _ in range(3):
    out = loss(frames, labels)
    out["loss"].backward()
    values.append(out["loss"].item())
mapped, heap, free = [], [], []
for _ in range(5):
    x = torch.ones(16 << 20)
    mapped.append(libc.mallinfo2().hblkhd)
    del x
    heap.append(libc.mallinfo2().arena)
    free.append(libc.mallinfo2().fordblks)
print(json.dumps({"loss": values, "mapped": mapped, "heap": heap, "free": free}))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt and mallinfo2 are glibc's")
def test_keeping_freed_memory_computes_the_same_and_reuses_the_heap():
    """`train.keep_freed_memory`: the same losses as glibc's default allocator. By default glibc maps a
    block that large apart from the heap (fresh pages, zero-filled one fault at a time) and unmaps it when
    freed; kept, the block comes from the heap, stays there once freed, and the next ones reuse it: the
    heap stops growing (after the second, which the first's free space may not fit)."""
    runs = {}
    for keep in ("false", "true"):
        proc = subprocess.run([sys.executable, "-c", _MALLOC_PROGRAM, keep], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        runs[keep] = json.loads(proc.stdout)
    assert runs["true"]["loss"] == runs["false"]["loss"]
    block = 64 << 20
    plain, kept = runs["false"], runs["true"]
    assert all(m >= block for m in plain["mapped"]), plain
    assert all(m < block for m in kept["mapped"]), kept
    assert all(f >= block for f in kept["free"]) and len(set(kept["heap"][1:])) == 1, kept


_LOADER_LEFT_AT_EXIT = """
import torch
from glitr_cli.runtime import Runtime
rt = Runtime(torch.device("cpu"), "fp32", False, False, False, False, threads=1, workers=2)
loader = rt.loader(list(range(64)), batch_size=4)
print(next(iter(loader)).tolist())  # the persistent workers are running, and stay referenced
"""


def test_a_process_ends_with_loader_workers_still_running():
    """Workers ignore SIGTERM, which Python's exit handler sends them before waiting for them: the
    runtime ends its loaders' workers at exit first."""
    proc = subprocess.run([sys.executable, "-c", _LOADER_LEFT_AT_EXIT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[0, 1, 2, 3]", proc.stderr


@pytest.mark.parametrize("cores,gpu,cpu", [(16, 15, 8), (2, 1, 1), (1, 0, 0)])
def test_automatic_workers_leave_the_training_process_its_cores(monkeypatch, cores, gpu, cpu):
    """`data.workers: auto`: one core stays with a GPU's training process, half of them on the CPU."""
    monkeypatch.setattr(runtime, "available_cores", lambda: cores)
    assert auto_workers(torch.device("cuda")) == gpu and auto_workers(torch.device("cpu")) == cpu


def test_the_cores_are_shared_by_the_processes_of_a_torchrun_job(monkeypatch):
    alone = available_cores()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert available_cores() == max(1, alone // 2)


def test_the_thread_count_is_recorded_and_a_resumed_run_keeps_it(tmp_path, toy_data, monkeypatch):
    """Float results depend on the thread count: the run records the one it chose, and a rerun of the
    same command (on other workers, so another automatic choice) continues with it."""
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # what the automatic choice picks here
    out = f"output_dir={tmp_path / 'run'}"
    first = Trainer(tiny_recipe(tmp_path, toy_data, "teacher", out, "train.threads=0"))
    first.fit(max_steps=4)
    assert first.runtime.threads == torch.get_num_threads() == 3
    assert load_recipe(tmp_path / "run/recipe.yaml").train.threads == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    second = Trainer(tiny_recipe(tmp_path, toy_data, "teacher", out, "train.threads=0"))
    second.fit()
    assert second.runtime.threads == torch.get_num_threads() == 3
    third = Trainer(tiny_recipe(tmp_path, toy_data, "teacher", f"output_dir={tmp_path / 'new'}", "train.threads=0"))
    third.setup()
    assert third.runtime.threads == 1  # a new run chooses afresh


def test_device_augmentation_trains_and_resumes_bit_identically(tmp_path, toy_data):
    """`data.augment_on=device`: loader workers only decode; the trainer transforms each clip, seeded per clip."""
    device = ["data.augment_on=device"]
    ref = Trainer(tiny_recipe(tmp_path, toy_data, "teacher", f"output_dir={tmp_path / 'ref'}", *device))
    ref.fit()
    out = f"output_dir={tmp_path / 'run'}"
    first = Trainer(tiny_recipe(tmp_path, toy_data, "teacher", out, "data.workers=2", *device))
    first.fit(max_steps=7)
    second = Trainer(tiny_recipe(tmp_path, toy_data, "teacher", out, *device))
    second.fit()
    assert second.step == ref.step == 8
    assert_same_weights(
        model_weights(tmp_path / "run/checkpoints/last.pt"), model_weights(tmp_path / "ref/checkpoints/last.pt")
    )


def test_device_augment_is_seeded_per_clip_and_leaves_the_global_generator_alone():
    g = torch.Generator().manual_seed(0)
    frames = [torch.randint(0, 256, (3, 3, 40, 40 + 8 * i), dtype=torch.uint8, generator=g) for i in range(3)]
    items = [(clip, i, 100 + i) for i, clip in enumerate(frames)]
    clips, labels, seeds = collate_uint8_clips(items)  # clips of several widths stay a list
    assert [c.shape[-1] for c in clips] == [40, 48, 56] and labels.tolist() == [0, 1, 2]
    augment = DeviceAugment(train_transform(32, scale=(0.3, 1.0)), torch.device("cpu"))
    state = torch.get_rng_state()
    a, b = augment(clips, seeds), augment(clips, seeds)
    assert torch.equal(torch.get_rng_state(), state)
    assert a.shape == (3, 3, 3, 32, 32) and a.dtype == torch.float32 and torch.equal(a, b)
    c = augment(clips, seeds + 1)
    assert not torch.equal(a, c)


def test_decoding_on_the_device_trains_as_decoding_in_the_loader(tmp_path, toy_data):
    """`data.decode_on=device`: the workers only read the files, the trainer decodes each batch; the same
    uint8 clips, so the same weights (on a GPU nvJPEG decodes: tests/test_cuda.py)."""
    device = ["data.augment_on=device"]
    ref = Trainer(tiny_recipe(tmp_path, toy_data, "teacher", f"output_dir={tmp_path / 'ref'}", *device))
    ref.fit()
    decoding = [*device, "data.decode_on=device", "data.workers=2"]
    run = Trainer(tiny_recipe(tmp_path, toy_data, "teacher", f"output_dir={tmp_path / 'run'}", *decoding))
    run.fit()
    assert run.step == ref.step == 8
    assert_same_weights(
        model_weights(tmp_path / "run/checkpoints/last.pt"), model_weights(tmp_path / "ref/checkpoints/last.pt")
    )


@pytest.mark.parametrize("decode_on", ["loader", "device"])
def test_bad_training_data_is_counted_listed_and_bounded(tmp_path, toy_data, decode_on):
    data = tmp_path / "data"
    shutil.copytree(toy_data, data)
    root = data / "toy"
    ids = [line.split()[0] for line in (root / "train_videofolder.txt").read_text().splitlines()]
    corrupt, missing = ids[0], ids[1]
    frames = sorted((root / "frames" / corrupt).iterdir())
    for f in frames[1:]:  # all frames but the first are corrupt JPEG data
        f.write_bytes(f.read_bytes()[:50])
    shutil.rmtree(root / "frames" / missing)
    (root / "frames" / missing).mkdir()  # no frame of this clip can be read

    # decoding on the device: a clip with a bad file is read as the loader reads it, and counted the same
    overrides = ["train.eval_every=0", f"output_dir={tmp_path / 'run'}", f"data.decode_on={decode_on}"]
    overrides += ["data.augment_on=device"] if decode_on == "device" else []
    Trainer(tiny_recipe(tmp_path, data, "teacher", *overrides, "data.max_bad_fraction=0.2")).fit()
    per_epoch = [r for r in read_metrics(tmp_path / "run") if r["split"] == "data"]
    assert [r["epoch"] for r in per_epoch] == [1, 2]
    for r in per_epoch:  # every clip is read once per epoch (16 clips, 4 steps of 4)
        assert r["bad_clips"] == 2 and r["unreadable_clips"] == 1
        assert r["replaced_frames"] >= 3 + 4  # the corrupt clip's sampled frames but its first, all of the other's
    listed = [json.loads(line) for line in (tmp_path / "run" / "bad_clips.jsonl").read_text().splitlines()]
    assert [(c["epoch"], c["id"], c["unreadable"]) for c in listed] == [
        (1, missing, True), (1, corrupt, False), (2, missing, True), (2, corrupt, False)
    ]  # fmt: skip

    strict = Trainer(tiny_recipe(tmp_path, data, "teacher", *overrides, "output_dir=" + str(tmp_path / "strict")))
    with pytest.raises(GlitrError) as e:  # the default 1 %: two bad clips of 16 stop the run
        strict.fit()
    message = str(e.value)  # at the first log step that sees a bad clip: 1 > 1 % of 16
    assert "training clips of epoch 1 had unreadable frames, more than data.max_bad_fraction=0.01" in message
    assert f"{missing} (unreadable)" in message or f"{corrupt} (" in message and "frames replaced" in message
    assert "strict/bad_clips.jsonl" in message and (tmp_path / "strict/bad_clips.jsonl").read_text()
