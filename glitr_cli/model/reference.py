"""The plain reference path: what the original GliTr code computes, the way it computes it (float32,
explicit softmax attention, T_c and T_l re-run over the whole prefix at every step, deep copies of the
backbone and class head for the teacher's location losses). Training never takes it: the tests use it
as the oracle the fast path must equal, `glitr bench` as the yardstick of its speed-ups.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from glitr_cli.model.glitr import (
    GliTr,
    StudentObjective,
    StudentOutput,
    TeacherObjective,
    kl_divergence,
    step_cross_entropy,
)


def plain_student_forward(student: GliTr, frames: torch.Tensor) -> StudentOutput:
    """The original's student loop: at step t both heads re-read all t features (O(T^2))."""
    b, t = frames.shape[:2]
    loc = student.initial_location(b)
    feats, logits, locs = [], [], []
    for i in range(t):
        locs.append(loc)
        feats.append(student.backbone(frames[:, i], loc))
        prefix = torch.stack(feats, dim=1)  # (B, i + 1, D)
        loc = student.locator(prefix.detach())[:, -1]
        logits.append(student.classifier(prefix)[:, -1])
    return StudentOutput(torch.stack(feats, 1), torch.stack(logits, 1), torch.stack(locs, 1))


class PlainStudentObjective(StudentObjective):
    """The student loss of the original: the same losses, the student run by `plain_student_forward`."""

    def student_forward(self, frames: torch.Tensor) -> StudentOutput:
        return plain_student_forward(self.student, frames)


class PlainTeacherObjective(TeacherObjective):
    """The teacher loss of the original: frozen snapshots for the location losses are deep copies."""

    def forward(self, frames: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        model = self.model
        out = model.forward_teacher(frames)
        b, t = frames.shape[:2]
        cls = step_cross_entropy(out.logits, target, self.label_smoothing)
        backbone = copy.deepcopy(model.backbone).requires_grad_(False)
        classifier = copy.deepcopy(model.classifier).requires_grad_(False)
        glimpse_feat = backbone(frames.flatten(0, 1), out.locs.flatten(0, 1)).view(b, t, -1)  # (B, T, D)
        loc_mse = F.mse_loss(glimpse_feat, out.feat.detach())
        loc_kld = kl_divergence(classifier(glimpse_feat), out.logits)
        distill = out.logits.new_zeros(())
        if self.videomae is not None:
            with torch.no_grad():
                target_logits = self.videomae.forward_clip(frames)
            distill = kl_divergence(out.logits[:, -1], target_logits)
        added, extra = self.extra_terms(frames, out, locator_trains=True)
        loss = cls + distill + loc_mse + loc_kld + added
        return {
            "loss": loss,
            "cls": cls,
            "distill": distill,
            "loc_mse": loc_mse,
            "loc_kld": loc_kld,
            **extra,
            "logits": out.logits,
        }
