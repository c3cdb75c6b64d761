"""Mixup and CutMix for clips, and label-smoothed soft targets. A batch is mixed with itself reversed, one
λ ~ Beta(α, α) per batch; CutMix pastes the same box in every frame, so λ is the true area fraction.
The draws come from torch's global generator, which checkpoints save.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def soft_targets(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """One-hot rows (B, C) with `smoothing` spread uniformly: 1 - s + s/C on the label, s/C elsewhere."""
    off = smoothing / num_classes
    out = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return out.scatter_(1, labels[:, None], 1.0 - smoothing + off)


def _beta(alpha: float) -> float:
    a = torch.tensor(float(alpha))
    return float(torch.distributions.Beta(a, a).sample())


def cutmix_box(lam: float, height: int, width: int) -> tuple[int, int, int, int]:
    """A box (y0, y1, x0, x1) of about (1 - lam) of the frame area, centred uniformly, clipped to the frame."""
    ratio = (1.0 - lam) ** 0.5
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy = int(torch.randint(height, ()).item())
    cx = int(torch.randint(width, ()).item())
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return y0, y1, x0, x1


@dataclass
class MixupCutmix:
    """Callable (clips (B, T, C, H, W), labels (B,)) -> (mixed clips, soft targets (B, num_classes))."""

    num_classes: int
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0  # probability that a batch is mixed at all
    switch_prob: float = 0.5  # probability of CutMix when both are enabled
    label_smoothing: float = 0.0

    @property
    def active(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def __call__(self, clips: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lam = 1.0
        if self.active and float(torch.rand(())) < self.prob:
            use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or float(torch.rand(())) < self.switch_prob)
            flipped = clips.flip(0)
            if use_cutmix:
                lam = _beta(self.cutmix_alpha)
                h, w = clips.shape[-2:]
                y0, y1, x0, x1 = cutmix_box(lam, h, w)
                clips = clips.clone()
                clips[..., y0:y1, x0:x1] = flipped[..., y0:y1, x0:x1]  # the same box in every frame
                lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
            else:
                lam = _beta(self.mixup_alpha)
                clips = clips * lam + flipped * (1.0 - lam)
        target = soft_targets(labels, self.num_classes, self.label_smoothing)
        return clips, target * lam + target.flip(0) * (1.0 - lam)
