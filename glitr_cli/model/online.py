"""Online prediction: one frame in, class probabilities so far and the next glimpse location out.

The predictor calls the very modules the student trains with, one step at a time: T_f on the
glimpse, then one `step` of T_c and T_l each against their KV caches, so a new frame costs
the same whatever the history. It runs several streams at once as a batch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from glitr_cli.errors import GlitrError
from glitr_cli.model.glitr import GliTr
from glitr_cli.model.temporal import KVCache


class StepOutput(NamedTuple):
    location: torch.Tensor  # (B, 2) where this frame's glimpse was taken
    logits: torch.Tensor  # (B, C) class logits given every frame so far
    probs: torch.Tensor  # (B, C) their softmax
    next_location: torch.Tensor  # (B, 2) where the next frame's glimpse will be taken


class OnlinePredictor:
    """Feed frames (B, 3, H, W) one at a time with `step`; `reset` starts new streams."""

    def __init__(self, model: GliTr, batch_size: int = 1) -> None:
        self.model = model.eval()
        self.reset(batch_size)

    def reset(self, batch_size: int = 1) -> None:
        self.batch_size = batch_size
        self.steps = 0
        self._cls_cache = KVCache(self.model.classifier.depth)
        self._loc_cache = KVCache(self.model.locator.depth)
        with torch.no_grad():
            self._next = self.model.initial_location(batch_size).clone()

    @torch.no_grad()
    def step(self, frame: torch.Tensor) -> StepOutput:
        model = self.model
        if self.steps >= model.num_frames:
            raise GlitrError(f"this model was trained for {model.num_frames} steps; call reset() to start again")
        if frame.shape[0] != self.batch_size:
            raise GlitrError(f"expected a batch of {self.batch_size} frames, got {frame.shape[0]}")
        loc = self._next.to(device=frame.device, dtype=frame.dtype)
        feat = model.backbone(frame, loc)  # (B, D)
        logits = model.classifier.step(feat, self._cls_cache)
        self._next = model.locator.step(feat, self._loc_cache)
        self.steps += 1
        return StepOutput(loc, logits, logits.softmax(dim=-1), self._next)
