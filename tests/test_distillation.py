"""The SSv2 teacher's VideoMAE distillation term, forward and backward, on tiny models."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from model_helpers import clips, tiny_glitr

from glitr_cli.model import TeacherObjective
from glitr_cli.model.reference import PlainTeacherObjective
from glitr_cli.model.videomae import build_videomae

CLASSES, FRAMES, SIZE = 5, 4, 32


def tiny_videomae() -> torch.nn.Module:
    torch.manual_seed(3)
    model = build_videomae(
        num_classes=CLASSES, num_frames=FRAMES, img_size=SIZE, patch_size=16, embed_dim=32, depth=1, num_heads=2
    )
    with torch.no_grad():  # a head that is far from uniform, so the targets carry information
        model.head.weight.normal_(0, 0.5)
    return model


def grads(model: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_distillation_value_and_which_weights_it_trains():
    teacher, videomae = tiny_glitr(num_classes=CLASSES, num_frames=FRAMES), tiny_videomae()
    frames, labels = clips(batch=3, frames=FRAMES, size=SIZE, smooth=True), torch.tensor([0, 3, 4])
    with_term = TeacherObjective(teacher, videomae)
    without = TeacherObjective(teacher)

    out = with_term(frames, labels)
    g_with = grads(teacher, out["loss"])
    g_without = grads(teacher, without(frames, labels)["loss"])

    # the value: KL(p || q) of the teacher's last-step distribution p to VideoMAE's q on the same clip
    logits_last = teacher.forward_teacher(frames).logits[:, -1]
    with torch.no_grad():
        log_q = F.log_softmax(videomae(frames.transpose(1, 2)), dim=-1)  # VideoMAE reads (B, C, T, H, W)
    log_p = F.log_softmax(logits_last, dim=-1)
    expected = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    assert out["distill"] > 0.01
    torch.testing.assert_close(out["distill"], expected.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out["loss"], out["cls"] + out["distill"] + out["loc_mse"] + out["loc_kld"])
    # the plain reference path computes the same term
    torch.testing.assert_close(PlainTeacherObjective(teacher, videomae)(frames, labels)["distill"], out["distill"])

    # the gradient the term adds is exactly the gradient of that KL: T_f and T_c learn from it,
    # T_l does not (the teacher's logits do not depend on where it would look), VideoMAE is frozen
    g_term = grads(teacher, expected)
    moved = set()
    for name, g in g_with.items():
        added = g - g_without[name]
        torch.testing.assert_close(added, g_term.get(name, torch.zeros_like(g)), rtol=1e-4, atol=1e-7)
        if added.abs().max() > 0:
            moved.add(name.split(".")[0])
    assert moved == {"backbone", "classifier"}
    assert all(p.grad is None and not p.requires_grad for p in videomae.parameters())
    with_term.train()  # the trainer's call: VideoMAE stays in eval mode while the teacher trains
    assert not videomae.training and teacher.training
