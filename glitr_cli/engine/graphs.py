"""A training micro-step (forward + backward) captured once as a CUDA graph and replayed: the student's
step is T small glimpse passes whose time on a GPU goes to kernel launches. The numbers are the eager
step's; inputs are copied into fixed buffers, outputs are overwritten by the next replay, and every
`.grad` keeps fixed storage, so gradients must be zeroed in place (`zero_grad(set_to_none=False)`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

LossFn = Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


class GraphedStep:
    """`step(frames, target)` runs `forward_backward(frames, target)` (which calls `.backward()`
    itself) as a CUDA graph. The graph is captured at the first call, after `warmup` eager calls
    on a side stream; a call with other shapes or dtypes captures again."""

    def __init__(self, forward_backward: LossFn, model: nn.Module, warmup: int = 2) -> None:
        self.forward_backward = forward_backward
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.warmup = warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self._key: tuple | None = None

    def __call__(self, frames: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        key = tuple((tuple(x.shape), x.dtype, x.device) for x in (frames, target))
        if key != self._key:
            self._capture(frames, target)
            self._key = key
        self._frames.copy_(frames)
        self._target.copy_(target)
        self.graph.replay()
        return self._out

    def _capture(self, frames: torch.Tensor, target: torch.Tensor) -> None:
        device = frames.device
        for p in self.params:  # gradients get fixed storage that the captured backward adds into
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        saved = [p.grad.clone() for p in self.params]
        self._frames, self._target = frames.clone(), target.clone()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # lazy initialisation (cuBLAS workspaces, compiled kernels) stays outside
            for _ in range(self.warmup):
                self.forward_backward(self._frames, self._target)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._out = self.forward_backward(self._frames, self._target)
        with torch.no_grad():  # undo what the warm-up calls accumulated
            for p, g in zip(self.params, saved, strict=True):
                p.grad.copy_(g)
