"""GliTr: the glimpse student, the full-frame teacher, and their training objectives.

Shapes: B clips, T frames, D backbone width, C classes. Frames are (B, T, 3, H, W), already
normalised; the model applies no normalisation of its own.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from glitr_cli.errors import GlitrError
from glitr_cli.model.spatial import SpatialEncoder, conv_stem, create_spatial_encoder
from glitr_cli.model.temporal import Locator, TemporalTransformer

POLICIES = ("learned", "center", "random")


class TeacherOutput(NamedTuple):
    feat: torch.Tensor  # (B, T, D) full-frame features
    logits: torch.Tensor  # (B, T, C) causal class logits
    locs: torch.Tensor  # (B, T, 2) glimpse location for each frame (init_loc first)


class StudentOutput(NamedTuple):
    feat: torch.Tensor  # (B, T, D) glimpse features
    logits: torch.Tensor  # (B, T, C) class logits emitted at each step
    locs: torch.Tensor  # (B, T, 2) where each glimpse was taken


class GliTr(nn.Module):
    """T_f (`backbone`), T_c (`classifier`) and T_l (`locator`); one class for teacher and student.

    The teacher runs `forward_teacher` on full frames, the student `forward_student` on glimpses;
    a student checkpoint is this module's state dict.
    """

    def __init__(self, backbone: SpatialEncoder, classifier: TemporalTransformer, locator: Locator) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier
        self.locator = locator

    @property
    def num_frames(self) -> int:
        return self.classifier.max_len

    @property
    def num_classes(self) -> int:
        return self.classifier.head.out_features

    @property
    def img_size(self) -> int:
        return self.backbone.grid_size[0] * self.backbone.patch_size

    @property
    def patch_size(self) -> int:
        return self.backbone.patch_size

    @property
    def glimpse_size(self) -> int:
        return self.backbone.glimpse_size

    def set_fused_attn(self, enabled: bool) -> None:
        """Switch every attention layer between fused SDPA and the explicit softmax path."""
        for module in (self.backbone, self.classifier, self.locator):
            module.set_fused_attn(enabled)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute T_f's, T_c's and T_l's block activations in backward instead of keeping them: less memory,
        about one more forward pass of compute. Passes without gradients (no_grad, evaluation) are unaffected."""
        for module in (self.backbone, self.classifier, self.locator):
            module.set_grad_checkpointing(enable)

    def compile(self, **kwargs) -> None:
        """`torch.compile` T_f, T_c and T_l in place, each on its own: the calls that have fixed
        shapes (T_f on one frame or glimpse batch, a full causal pass of T_c or T_l) become fused
        kernels, while the student's loop over t and T_l's cached `step` stay eager, so nothing
        recompiles as the sequence grows. Shapes are static (`dynamic=False`): each new batch
        shape compiles once. Parameter names and state dicts are unchanged."""
        kwargs.setdefault("dynamic", False)
        for module in (self.backbone, self.classifier, self.locator):
            module.compile(**kwargs)

    def initial_location(self, batch: int) -> torch.Tensor:
        return self.locator.init_loc[:, 0].expand(batch, 2)  # (B, 2)

    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """Full-frame features: (B, T, 3, H, W) -> (B, T, D)."""
        b, t = frames.shape[:2]
        return self.backbone(frames.flatten(0, 1)).view(b, t, -1)

    def forward_teacher(self, frames: torch.Tensor) -> TeacherOutput:
        """Full frames. Frame t's location is T_l's output after frames 0..t-1 (init_loc for t = 0)."""
        feat = self.encode_frames(frames)
        logits = self.classifier(feat)
        loc_raw = self.locator(feat.detach())  # (B, T, 2); the last one has no frame to look at
        locs = torch.cat([self.initial_location(feat.shape[0])[:, None], loc_raw[:, :-1]], dim=1)
        return TeacherOutput(feat, logits, locs)

    def forward_student(
        self, frames: torch.Tensor, policy: str = "learned", generator: torch.Generator | None = None
    ) -> StudentOutput:
        """Online glimpse pass: frame t is seen only through one glimpse at a location chosen from 0..t-1.

        `policy` "learned" asks T_l (through a KV cache, O(T) in all); "center" looks at (0, 0)
        and "random" at uniform locations that keep the glimpse inside the frame (baselines).
        Gradients reach T_l through the glimpse pixels and position embeddings; T_l's input is
        detached, so nothing flows from T_l into T_f.
        """
        if policy not in POLICIES:
            raise GlitrError(f"unknown glimpse policy {policy!r}; expected one of {', '.join(POLICIES)}")
        b, t = frames.shape[:2]
        if policy == "learned":
            loc = self.initial_location(b)
            cache = self.locator.new_cache()
        else:
            fixed = self._baseline_locations(policy, b, t, frames, generator)  # (B, T, 2)
        feats, locs = [], []
        for i in range(t):
            if policy != "learned":
                loc = fixed[:, i]
            locs.append(loc)
            f = self.backbone(frames[:, i], loc)  # (B, D)
            feats.append(f)
            if policy == "learned" and i < t - 1:
                loc = self.locator.step(f.detach(), cache)
        feat = torch.stack(feats, dim=1)  # (B, T, D)
        return StudentOutput(feat, self.classifier(feat), torch.stack(locs, dim=1))

    def _baseline_locations(
        self, policy: str, b: int, t: int, frames: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        if policy == "center":
            return frames.new_zeros(b, t, 2)
        reach = torch.tensor([1 - s for s in self.backbone.glimpse_scale], dtype=frames.dtype)
        u = torch.rand(b, t, 2, generator=generator, dtype=frames.dtype)
        return ((2 * u - 1) * reach).to(frames.device)


def step_cross_entropy(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy of every step's logits (B, T, C) against one target per clip, mean over B*T.

    `target` is class indices (B,) or a probability matrix (B, C) (mixup/cutmix soft targets).
    """
    b, t, c = logits.shape
    if target.dtype.is_floating_point:
        soft = target[:, None].expand(b, t, c)
        return torch.sum(-soft * F.log_softmax(logits, dim=-1), dim=-1).mean()
    return F.cross_entropy(logits.reshape(b * t, c), target.repeat_interleave(t), label_smoothing=label_smoothing)


def kl_divergence(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """Mean over leading positions of KL(p ‖ q) = Σ p (log p − log q), p = softmax(logits).

    The first argument is the distribution being trained; `target_logits` is detached.
    """
    log_p = F.log_softmax(logits, dim=-1)
    log_q = F.log_softmax(target_logits.detach(), dim=-1)
    return torch.sum(log_p.exp() * (log_p - log_q), dim=-1).mean()


def _frozen(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's current parameters, detached: the same weights with no gradient to them."""
    return {name: p.detach() for name, p in module.named_parameters()}


class TeacherObjective(nn.Module):
    """Full-frame teacher loss: L_cls (+ VideoMAE distillation) + T_l's location self-supervision.

    Glimpses at the predicted locations go through T_f and T_c with frozen weights (detached
    parameters via `functional_call`, no module copies), so L_mse and L_kld train only T_l and
    init_loc, through the glimpse pixels and resampled position embeddings. With "locator" in
    `leave_out` (T_l held still) they are not computed: the loss leaves them out and reports NaN.
    """

    def __init__(
        self,
        model: GliTr,
        videomae: nn.Module | None = None,
        label_smoothing: float = 0.0,
        glimpse_reading: float = 0.0,
        loc_centring: float = 0.0,
    ) -> None:
        super().__init__()
        self.model = model
        self.label_smoothing = label_smoothing
        self.glimpse_reading, self.loc_centring = glimpse_reading, loc_centring
        self.videomae = videomae
        self.leave_out: frozenset[str] = frozenset()
        if videomae is not None:
            videomae.requires_grad_(False)

    def extra_terms(
        self, frames: torch.Tensor, out: TeacherOutput, locator_trains: bool
    ) -> tuple[torch.Tensor | float, dict[str, torch.Tensor]]:
        """The optional loss terms (recipe options, off in the paper's recipes): what they add to the loss,
        and each term unweighted for the logs, present only when its weight is on.

        - `reading`: MSE of T_f's feature of one glimpse per frame, at a uniform random place inside the
          frame, to the frame's full-frame feature (detached). It trains T_f (only: the place is drawn,
          not chosen) to read glimpses, so that the location losses tell a glimpse near the target from
          one far from it, and not only one on the target from any other.
        - `centring`: the squared distance from the frame centre of the batch's mean location, averaged
          over the steps. It trains T_l (and init_loc) against sending every clip's glimpse the same way,
          which takes the glimpse out of reach of targets on the other side; NaN (and no loss) while T_l
          is held.
        """
        added: torch.Tensor | float = 0.0
        terms = {}
        if self.glimpse_reading:
            b, t = frames.shape[:2]
            places = self.model._baseline_locations("random", b, t, frames, None).flatten(0, 1)
            glimpse_feat = self.model.backbone(frames.flatten(0, 1), places).view(b, t, -1)
            terms["reading"] = F.mse_loss(glimpse_feat, out.feat.detach())
            added = added + self.glimpse_reading * terms["reading"]
        if self.loc_centring:
            if locator_trains:
                terms["centring"] = out.locs.mean(0).pow(2).sum(-1).mean()  # batch mean (T, 2) -> scalar
                added = added + self.loc_centring * terms["centring"]
            else:
                terms["centring"] = out.locs.new_full((), math.nan)
        return added, terms

    def train(self, mode: bool = True) -> TeacherObjective:
        super().train(mode)
        if self.videomae is not None:
            self.videomae.eval()
        return self

    def forward(
        self, frames: torch.Tensor, target: torch.Tensor, videomae_frames: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        model = self.model
        out = model.forward_teacher(frames)
        b, t = frames.shape[:2]
        cls = step_cross_entropy(out.logits, target, self.label_smoothing)

        distill = out.logits.new_zeros(())
        if self.videomae is not None:
            with torch.no_grad():
                target_logits = self.videomae.forward_clip(frames if videomae_frames is None else videomae_frames)
            distill = kl_divergence(out.logits[:, -1], target_logits)
        loss = cls + distill
        if "locator" in self.leave_out:
            loc_mse = loc_kld = cls.new_full((), math.nan)
        else:
            glimpse_feat = functional_call(
                model.backbone, _frozen(model.backbone), (frames.flatten(0, 1), out.locs.flatten(0, 1))
            ).view(b, t, -1)  # (B, T, D)
            glimpse_logits = functional_call(model.classifier, _frozen(model.classifier), (glimpse_feat,))
            loc_mse = F.mse_loss(glimpse_feat, out.feat.detach())
            loc_kld = kl_divergence(glimpse_logits, out.logits)
            loss = loss + loc_mse + loc_kld
        added, extra = self.extra_terms(frames, out, locator_trains="locator" not in self.leave_out)
        loss = loss + added
        return {
            "loss": loss,
            "cls": cls.detach(),
            "distill": distill.detach(),
            "loc_mse": loc_mse.detach(),
            "loc_kld": loc_kld.detach(),
            **{name: term.detach() for name, term in extra.items()},
            "logits": out.logits.detach(),
        }


class StudentObjective(nn.Module):
    """GliTr student loss: L_cls + spatial consistency (MSE to the teacher's full-frame features)
    + temporal consistency (KL of the student's per-step distribution to the teacher's).

    The teacher is frozen and always in eval mode; only `student` is trained and saved.
    """

    def __init__(self, student: GliTr, teacher: GliTr, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.student = student
        self.teacher = teacher
        self.label_smoothing = label_smoothing
        teacher.requires_grad_(False)
        teacher.eval()

    def train(self, mode: bool = True) -> StudentObjective:
        super().train(mode)
        self.teacher.eval()
        return self

    def student_forward(self, frames: torch.Tensor) -> StudentOutput:
        return self.student.forward_student(frames)

    def forward(self, frames: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            teacher_feat = self.teacher.encode_frames(frames)
            teacher_logits = self.teacher.classifier(teacher_feat)
        out = self.student_forward(frames)
        cls = step_cross_entropy(out.logits, labels, self.label_smoothing)
        spatial = F.mse_loss(out.feat, teacher_feat)
        temporal = kl_divergence(out.logits, teacher_logits)
        loss = cls + spatial + temporal
        return {
            "loss": loss,
            "cls": cls.detach(),
            "spatial": spatial.detach(),
            "temporal": temporal.detach(),
            "logits": out.logits.detach(),
        }


def build_glitr(
    *,
    num_classes: int,
    num_frames: int,
    img_size: int = 224,
    glimpse_size: int = 6,
    backbone: str = "vit_small_patch16_224",
    embed_dim: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
    patch_size: int | None = None,
    temporal_dim: int | None = None,
    temporal_depth: int = 4,
    temporal_heads: int = 6,
    drop_path: float = 0.0,
    fused_attn: bool = True,
    stem: str = "patch",
) -> GliTr:
    """Build GliTr with random weights. Paper geometry: ViT-S/16 T_f, temporal width 2D, 4 blocks, 6 heads.

    `stem` "patch" keeps the ViT's linear patch projection (the paper's); "conv" puts `conv_stem`
    in its place (a recipe option for models trained from random weights)."""
    spatial = create_spatial_encoder(
        backbone,
        img_size=img_size,
        glimpse_size=glimpse_size,
        drop_path=drop_path,
        fused_attn=fused_attn,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        patch_size=patch_size,
    )
    d = spatial.embed_dim
    width = 2 * d if temporal_dim is None else temporal_dim
    if width % temporal_heads:
        raise GlitrError(f"temporal_dim {width} is not divisible by temporal_heads {temporal_heads}")
    common = dict(depth=temporal_depth, num_heads=temporal_heads, drop_path=drop_path, fused_attn=fused_attn)
    classifier = TemporalTransformer(d, width, num_classes, num_frames, **common)
    locator = Locator(d, width, num_frames, **common)
    if stem == "conv":  # built last, so the other modules' random weights do not depend on the stem
        spatial.patch_embed.proj = conv_stem(d, spatial.patch_size)
    elif stem != "patch":
        raise GlitrError(f"unknown stem {stem!r}; expected patch (the ViT's linear projection) or conv")
    return GliTr(spatial, classifier, locator)
