"""Online prediction: one frame in, class probabilities so far and the next glimpse location out.

The predictor calls the very modules the student trains with, one step at a time: T_f on the
glimpse, then one `step` of T_c and T_l each against their KV caches, so a new frame costs
the same whatever the history. It runs several streams at once as a batch.

On a CUDA device each of the T steps is captured once as a CUDA graph (the caches have fixed
storage, so step t always has the same shapes) and replayed for every later stream: a frame
then costs a handful of launches instead of a few hundred, which is what batch-1 latency is
made of. The graphs compute the same numbers as the eager steps.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch

from glitr_cli.errors import GlitrError
from glitr_cli.model.glitr import GliTr


class StepOutput(NamedTuple):
    location: torch.Tensor  # (B, 2) where this frame's glimpse was taken
    logits: torch.Tensor  # (B, C) class logits given every frame so far
    probs: torch.Tensor  # (B, C) their softmax
    next_location: torch.Tensor  # (B, 2) where the next frame's glimpse will be taken


class OnlinePredictor:
    """Feed frames (B, 3, H, W) one at a time with `step`; `reset` starts new streams.

    `amp_dtype` (CUDA only) runs each step under autocast to that dtype; `cuda_graphs` captures
    the steps as CUDA graphs when the model is on a CUDA device (ignored elsewhere).
    """

    def __init__(
        self, model: GliTr, batch_size: int = 1, amp_dtype: torch.dtype | None = None, cuda_graphs: bool = True
    ) -> None:
        self.model = model.eval()
        self.amp_dtype = amp_dtype
        self.cuda_graphs = cuda_graphs
        self._graphs: list[tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...]]] = []
        self._graph_key: tuple | None = None
        self._cls_cache = model.classifier.new_static_cache()
        self._loc_cache = model.locator.new_static_cache()
        self.reset(batch_size)

    def reset(self, batch_size: int = 1) -> None:
        self.batch_size = batch_size
        self.steps = 0
        self._cls_cache.length = self._loc_cache.length = 0  # storage stays: captured graphs point at it
        with torch.no_grad():
            self._next = self.model.initial_location(batch_size).clone()

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None or device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.amp_dtype, cache_enabled=False)

    def _compute(self, frame: torch.Tensor, loc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.model
        with self._autocast(frame.device):
            feat = model.backbone(frame, loc)  # (B, D)
            logits = model.classifier.step(feat, self._cls_cache)
            nxt = model.locator.step(feat, self._loc_cache)
        return logits, nxt

    @torch.no_grad()
    def step(self, frame: torch.Tensor) -> StepOutput:
        model = self.model
        if self.steps >= model.num_frames:
            raise GlitrError(f"this model was trained for {model.num_frames} steps; call reset() to start again")
        if frame.shape[0] != self.batch_size:
            raise GlitrError(f"expected a batch of {self.batch_size} frames, got {frame.shape[0]}")
        if self.cuda_graphs and frame.device.type == "cuda":
            return self._replay(frame)
        loc = self._next.to(device=frame.device, dtype=frame.dtype)
        logits, self._next = self._compute(frame, loc)
        self.steps += 1
        return StepOutput(loc, logits, logits.softmax(dim=-1), self._next)

    def _replay(self, frame: torch.Tensor) -> StepOutput:
        key = (tuple(frame.shape), frame.dtype, frame.device)
        if key != self._graph_key:
            self._capture(frame)
            self._graph_key = key
        if self.steps == 0:
            self._static_loc.copy_(self._next)  # the initial location of the new streams
        self._static_frame.copy_(frame)
        graph, (loc, logits, nxt) = self._graphs[self.steps]
        graph.replay()
        self.steps += 1
        self._next = nxt.clone()
        logits = logits.clone()
        return StepOutput(loc.clone(), logits, logits.softmax(dim=-1), self._next)

    def _capture(self, frame: torch.Tensor) -> None:
        """Record one graph per step t (0..T-1) on placeholder streams; the caches keep fixed storage."""
        t_max = self.model.num_frames
        self._static_frame = frame.clone()
        self._static_loc = self.model.initial_location(frame.shape[0]).to(frame).clone()
        side = torch.cuda.Stream(frame.device)
        side.wait_stream(torch.cuda.current_stream(frame.device))
        with torch.cuda.stream(side):  # warm-up: lazy library initialisation stays out of the graphs
            self.reset(self.batch_size)
            for _ in range(t_max):
                self._compute(self._static_frame, self._static_loc)
        torch.cuda.current_stream(frame.device).wait_stream(side)
        self.reset(self.batch_size)
        self._graphs, pool = [], None
        for _ in range(t_max):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                loc = self._static_loc.clone()
                logits, nxt = self._compute(self._static_frame, self._static_loc)
                self._static_loc.copy_(nxt)
            pool = graph.pool()
            self._graphs.append((graph, (loc, logits, nxt)))
        self.reset(self.batch_size)
