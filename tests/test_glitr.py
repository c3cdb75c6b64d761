import copy

import pytest
import torch
from model_helpers import TINY, clips, tiny_glitr

from glitr_cli.errors import GlitrError
from glitr_cli.model import StudentObjective, TeacherObjective, build_glitr, kl_divergence, step_cross_entropy


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.clone() for n, p in module.named_parameters()}


def _nonzero(grads: dict) -> set[str]:
    return {n for n, g in grads.items() if g is not None and g.abs().sum() > 0}


def test_student_locator_input_is_detached():
    """Only T_l and init_loc receive gradient from the locations: nothing reaches T_f through T_l."""
    model = tiny_glitr()
    out = model.forward_student(clips())
    out.locs.sum().backward()
    assert not _nonzero(_grads(model.backbone)) and not _nonzero(_grads(model.classifier))
    assert "init_loc" in _nonzero(_grads(model.locator))


def test_student_objective_trains_every_student_module_and_no_teacher_weight():
    student, teacher = tiny_glitr(0), tiny_glitr(1)
    objective = StudentObjective(student, teacher).train()
    assert not teacher.training
    losses = objective(clips(), torch.tensor([1, 3]))
    losses["loss"].backward()
    assert set(losses) >= {"loss", "cls", "spatial", "temporal", "logits"}
    torch.testing.assert_close(losses["loss"].detach(), losses["cls"] + losses["spatial"] + losses["temporal"])
    # T_l learns through the glimpses it chose (the location is not detached before sampling)
    assert {"init_loc", "head.weight"} <= _nonzero(_grads(student.locator))
    assert _nonzero(_grads(student.backbone)) and _nonzero(_grads(student.classifier))
    assert all(p.grad is None for p in teacher.parameters())


def test_teacher_location_losses_train_only_the_locator():
    model = tiny_glitr()
    x, y = clips(), torch.tensor([0, 2])
    TeacherObjective(model)(x, y)["loss"].backward()
    full = _grads(model)
    model.zero_grad(set_to_none=True)
    step_cross_entropy(model.forward_teacher(x).logits, y).backward()
    cls_only = _grads(model)
    for name, g in full.items():
        if name.startswith("locator."):
            continue
        torch.testing.assert_close(g, cls_only[name], msg=f"location losses reached {name}")
    assert {"locator.init_loc", "locator.head.weight"} <= _nonzero(full)
    assert not _nonzero({k: v for k, v in cls_only.items() if k.startswith("locator.")})


def test_teacher_extra_terms_train_only_their_module():
    """Glimpse reading trains T_f alone (its places are drawn); centring trains T_l alone (and only while
    it trains); with both weights 0 the loss is the paper's and logs neither."""
    model = tiny_glitr()
    x = clips()
    out = model.forward_teacher(x)
    added, terms = TeacherObjective(model, glimpse_reading=0.5, loc_centring=2.0).extra_terms(x, out, True)
    torch.testing.assert_close(added, 0.5 * terms["reading"] + 2.0 * terms["centring"])
    for name, module in (("reading", "backbone."), ("centring", "locator.")):
        model.zero_grad(set_to_none=True)
        terms[name].backward(retain_graph=True)
        reached = _nonzero(_grads(model))
        assert reached and all(k.startswith(module) for k in reached), (name, reached)
    held_added, held = TeacherObjective(model, loc_centring=2.0).extra_terms(x, out, False)
    assert held_added == 0.0 and held.keys() == {"centring"} and held["centring"].isnan()
    assert TeacherObjective(model).extra_terms(x, out, True) == (0.0, {})
    y = torch.tensor([0, 2])
    assert "reading" not in TeacherObjective(model)(x, y)
    on = TeacherObjective(model, glimpse_reading=0.5, loc_centring=2.0)
    on.leave_out = frozenset({"locator"})
    logged = on(x, y)
    assert logged["reading"] > 0 and logged["centring"].isnan()


def test_teacher_locations_shift_by_one_frame():
    model = tiny_glitr().eval()
    with torch.no_grad():
        out = model.forward_teacher(clips())
        raw = model.locator(out.feat)
    torch.testing.assert_close(out.locs[:, 0], model.locator.init_loc[:, 0].expand(2, 2))
    torch.testing.assert_close(out.locs[:, 1:], raw[:, :-1])


def test_no_module_copies_in_a_training_step(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("copy.deepcopy called inside a training step")

    student, teacher = tiny_glitr(0), tiny_glitr(1)
    monkeypatch.setattr(copy, "deepcopy", forbidden)
    TeacherObjective(teacher)(clips(), torch.tensor([0, 1]))["loss"].backward()
    StudentObjective(student, teacher)(clips(), torch.tensor([0, 1]))["loss"].backward()


def test_student_loop_is_linear_in_t():
    """One incremental T_l step per new glimpse (T-1 in all, one token each) and one causal T_c pass."""
    model = tiny_glitr()
    seen = {"locator": [], "classifier": []}
    model.locator.blocks[0].register_forward_hook(lambda m, a, o: seen["locator"].append(a[0].shape[1]))
    model.classifier.blocks[0].register_forward_hook(lambda m, a, o: seen["classifier"].append(a[0].shape[1]))
    model.forward_student(clips())
    assert seen["locator"] == [1] * (TINY["num_frames"] - 1)
    assert seen["classifier"] == [TINY["num_frames"]]


def test_student_equals_prefix_recomputation():
    """The KV-cached loop computes what the original's per-step recomputation over the prefix computes."""
    model = tiny_glitr().double().eval()
    x = clips().double()
    with torch.no_grad():
        out = model.forward_student(x)
        loc = model.locator.init_loc[:, 0].expand(2, 2)
        feats = []
        for t in range(x.shape[1]):
            torch.testing.assert_close(out.locs[:, t], loc)
            feats.append(model.backbone(x[:, t], loc))
            prefix = torch.stack(feats, 1)
            torch.testing.assert_close(out.logits[:, t], model.classifier(prefix)[:, -1])
            loc = model.locator(prefix)[:, -1]


def test_baseline_policies():
    model = tiny_glitr().eval()
    x = clips()
    with torch.no_grad():
        center = model.forward_student(x, policy="center")
        r1 = model.forward_student(x, policy="random", generator=torch.Generator().manual_seed(3))
        r2 = model.forward_student(x, policy="random", generator=torch.Generator().manual_seed(3))
    assert center.locs.abs().max() == 0
    torch.testing.assert_close(r1.locs, r2.locs)
    reach = 1 - TINY["glimpse_size"] * TINY["patch_size"] / TINY["img_size"]
    assert r1.locs.abs().max() <= reach and r1.locs.std() > 0.1
    with pytest.raises(GlitrError, match="unknown glimpse policy"):
        model.forward_student(x, policy="middle")


def test_losses():
    logits = torch.randn(2, 3, 4)
    labels = torch.tensor([1, 2])
    onehot = torch.nn.functional.one_hot(labels, 4).float()
    torch.testing.assert_close(step_cross_entropy(logits, onehot), step_cross_entropy(logits, labels))
    smooth = step_cross_entropy(logits, labels, label_smoothing=0.1)
    soft = 0.9 * onehot + 0.1 / 4
    torch.testing.assert_close(smooth, step_cross_entropy(logits, soft))
    other = torch.randn(2, 3, 4)
    p = logits.softmax(-1)
    expected = (p * (logits.log_softmax(-1) - other.log_softmax(-1))).sum(-1).mean()
    torch.testing.assert_close(kl_divergence(logits, other), expected)
    assert kl_divergence(logits, logits) == pytest.approx(0, abs=1e-6)


def test_build_errors_are_clear():
    with pytest.raises(GlitrError, match="larger than the 4x4 patch grid"):
        build_glitr(**{**TINY, "glimpse_size": 5})
    with pytest.raises(GlitrError, match="no_such_vit"):
        build_glitr(**{**TINY, "backbone": "no_such_vit"})
    with pytest.raises(GlitrError, match="not divisible"):
        build_glitr(**{**TINY, "temporal_heads": 3})


def test_fused_and_manual_attention_give_the_same_model():
    model = tiny_glitr().eval()
    x = clips()
    with torch.no_grad():
        fused = model.forward_teacher(x)
        model.set_fused_attn(False)
        manual = model.forward_teacher(x)
    for a, b in zip(fused, manual, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _count_checkpoints(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = []
    checkpoint = torch.utils.checkpoint.checkpoint

    def counted(*args, **kwargs):
        calls.append(1)
        return checkpoint(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counted)
    return calls


@pytest.mark.parametrize("kind", ["student", "teacher"])
def test_grad_checkpointing_gives_the_same_losses_and_gradients(kind, monkeypatch):
    """Recomputing activations in backward changes no loss and no gradient, drop-path on (the teacher's frozen
    glimpse pass on detached weights is not checkpointed: a recompute would run on the live weights)."""
    calls = _count_checkpoints(monkeypatch)
    x, y = clips(), torch.tensor([1, 3])
    results = []
    for checkpointing in (False, True):
        model = tiny_glitr(0, drop_path=0.2)
        model.set_grad_checkpointing(checkpointing)
        objective = StudentObjective(model, tiny_glitr(1)) if kind == "student" else TeacherObjective(model)
        torch.manual_seed(5)
        losses = objective.train()(x, y)
        losses["loss"].backward()
        results.append(({k: v.detach() for k, v in losses.items()}, _grads(model)))
        assert bool(calls) == checkpointing
    (plain_losses, plain_grads), (losses, grads) = results
    torch.testing.assert_close(losses, plain_losses, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grads, plain_grads, rtol=1e-6, atol=1e-7)


def test_grad_checkpointing_leaves_passes_without_gradients_alone(monkeypatch):
    calls = _count_checkpoints(monkeypatch)
    model = tiny_glitr()
    model.set_grad_checkpointing(True)
    with torch.no_grad():
        model.forward_teacher(clips())
        model.forward_student(clips())
    assert not calls
