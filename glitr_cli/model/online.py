"""Online prediction: one frame in, class probabilities so far and the next glimpse location out.

The predictor calls the very modules the student trains with, one step at a time: T_f on the glimpse,
then one `step` of T_c and T_l each against their KV caches, for several streams at once as a batch. On
CUDA each of the T steps is captured once as a CUDA graph (the caches have fixed storage) and replayed.
`next_box()` and `step(crop=...)` take only the pixels the next glimpse reads; `StepGraph` is the
sliding step as one stateless function, what `glitr export` writes. After T steps `context` None
refuses, "restart" starts a new window and "sliding" re-runs T_c and T_l over the last T glimpse
features (docs/online.md#streams-longer-than-t).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

import torch

from glitr_cli.errors import GlitrError
from glitr_cli.model.glimpse import extract_glimpse_from_box, extract_glimpse_separable, glimpse_read_box
from glitr_cli.model.glitr import GliTr
from glitr_cli.model.temporal import SlotKVCache

CONTEXTS = ("sliding", "restart")


class StepOutput(NamedTuple):
    location: torch.Tensor  # (B, 2) where this frame's glimpse was taken
    logits: torch.Tensor | None  # (B, C) class logits given every frame so far (None: ONNX gives probs only)
    probs: torch.Tensor  # (B, C) their softmax
    next_location: torch.Tensor  # (B, 2) where the next frame's glimpse will be taken


class OnlinePredictor:
    """Feed frames (B, 3, H, W) one at a time with `step`; `reset` starts new streams.

    `amp_dtype` (CUDA only) runs each step under autocast to that dtype; `cuda_graphs` captures
    the steps as CUDA graphs when the model is on a CUDA device (ignored elsewhere). `context`
    (None, "sliding" or "restart") says what follows the T-th step (see the module docstring).
    `frames` counts the frames fed since `reset`, `t` the ones in the current context
    (at most T).
    """

    def __init__(
        self,
        model: GliTr,
        batch_size: int = 1,
        amp_dtype: torch.dtype | None = None,
        cuda_graphs: bool = True,
        context: str | None = None,
    ) -> None:
        if context is not None and context not in CONTEXTS:
            raise GlitrError(f"unknown context {context!r}; expected one of {', '.join(CONTEXTS)}")
        self.model = model.eval()
        self.context = context
        self.amp_dtype = amp_dtype
        self.cuda_graphs = cuda_graphs
        self._graphs: list[tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...]]] = []
        self._graph_key: tuple | None = None
        self._cls_cache = model.classifier.new_static_cache()
        self._loc_cache = model.locator.new_static_cache()
        self.reset(batch_size)

    def reset(self, batch_size: int = 1) -> None:
        self.batch_size = batch_size
        self.frames = 0
        self._new_window()

    def _new_window(self) -> None:
        self.t = 0
        self._feats: list[torch.Tensor] = []  # sliding: the last T glimpse features, each (B, D)
        self._cls_cache.length = self._loc_cache.length = 0  # storage stays: captured graphs point at it
        with torch.no_grad():
            self._next = self.model.initial_location(self.batch_size).clone()

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None or device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.amp_dtype, cache_enabled=False)

    @property
    def glimpse_scale(self) -> tuple[float, float]:
        return self.model.backbone.glimpse_scale

    @property
    def glimpse_pixels(self) -> int:
        return self.model.backbone.glimpse_pixels

    def next_box(self) -> torch.Tensor:
        """The pixels the next step reads: (B, 4) int64 boxes (x0, y0, x1, y1), end exclusive, in the
        S x S model input (evaluation's resized and centre-cropped frame; integers are pixel centres).

        Every box has the same size and may reach outside the model input; `step(crop=...)` takes
        these pixels alone, zeros where the box leaves the model input."""
        s = self.model.img_size
        return glimpse_read_box(self._next.detach(), (s, s), self.model.backbone.glimpse_scale)

    def _feature(self, image: torch.Tensor, loc: torch.Tensor, box: torch.Tensor | None) -> torch.Tensor:
        """T_f on a whole frame (`box` None) or on the crop `box` of one -> (B, D)."""
        backbone = self.model.backbone
        if box is None:
            return backbone(image, loc)
        s, side = self.model.img_size, backbone.glimpse_pixels
        glimpses = extract_glimpse_from_box(image, box, loc, (s, s), (side, side), backbone.glimpse_scale)
        return backbone.encode_glimpses(glimpses, loc)

    def _compute(
        self, frame: torch.Tensor, loc: torch.Tensor, box: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        model = self.model
        with self._autocast(frame.device):
            feat = self._feature(frame, loc, box)  # (B, D)
            logits = model.classifier.step(feat, self._cls_cache)
            nxt = model.locator.step(feat, self._loc_cache)
        return logits, nxt, feat

    def _slide(
        self, frame: torch.Tensor, loc: torch.Tensor, box: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A step after the T-th: T_f on the new frame, then T_c and T_l over the last T features."""
        model = self.model
        with self._autocast(frame.device):
            feat = self._feature(frame, loc, box)  # (B, D)
            seq = torch.stack([*self._feats[1:], feat], dim=1)  # (B, T, D), positions 1..T
            logits = model.classifier(seq)[:, -1]
            nxt = model.locator(seq)[:, -1]
        return logits, nxt, feat

    @torch.no_grad()
    def step(self, frame: torch.Tensor | None = None, *, crop: torch.Tensor | None = None) -> StepOutput:
        """One frame of every stream: the whole model input `frame` (B, 3, S, S), or only the pixels
        of `next_box()` as `crop` (B, 3, y1 - y0, x1 - x0), the same numbers up to float rounding.
        The crop path runs eagerly (no CUDA graphs)."""
        model = self.model
        if (frame is None) == (crop is None):
            raise GlitrError("pass either a frame or the crop of next_box()")
        box = None
        if crop is not None:
            box = self.next_box().to(crop.device)
            want = (self.batch_size, 3, int(box[0, 3] - box[0, 1]), int(box[0, 2] - box[0, 0]))
            if tuple(crop.shape) != want:
                raise GlitrError(f"expected the crops of next_box(), shape {want}, got {tuple(crop.shape)}")
            frame = crop
        if frame.shape[0] != self.batch_size:
            raise GlitrError(f"expected a batch of {self.batch_size} frames, got {frame.shape[0]}")
        if self.t >= model.num_frames:
            if self.context is None:
                raise GlitrError(f"this model was trained for {model.num_frames} steps; call reset() to start again")
            if self.context == "restart":
                self._new_window()
        if box is None and self.t < model.num_frames and self.cuda_graphs and frame.device.type == "cuda":
            return self._replay(frame)
        loc = self._next.to(device=frame.device, dtype=frame.dtype)
        if self.t < model.num_frames:
            logits, self._next, feat = self._compute(frame, loc, box)
            self.t += 1
        else:
            logits, self._next, feat = self._slide(frame, loc, box)
        self._keep(feat)
        return StepOutput(loc, logits, logits.softmax(dim=-1), self._next)

    def _keep(self, feat: torch.Tensor) -> None:
        self.frames += 1
        if self.context == "sliding":
            self._feats = [*self._feats, feat][-self.model.num_frames :]
        if self.context == "restart" and self.t == self.model.num_frames:  # the next frame opens a new window
            self._next = self.model.initial_location(self.batch_size).to(self._next).clone()

    def _replay(self, frame: torch.Tensor) -> StepOutput:
        key = (tuple(frame.shape), frame.dtype, frame.device)
        if key != self._graph_key:
            self._capture(frame)
            self._graph_key = key
        self._static_loc.copy_(self._next)  # the graphs carry it from step to step; an eager step may come between
        self._static_frame.copy_(frame)
        graph, (loc, logits, nxt, feat) = self._graphs[self.t]
        graph.replay()
        self.t += 1
        self._cls_cache.length = self._loc_cache.length = self.t  # for eager steps that follow
        self._next = nxt.clone()
        logits = logits.clone()
        self._keep(feat.clone())
        return StepOutput(loc.clone(), logits, logits.softmax(dim=-1), self._next)

    @contextlib.contextmanager
    def _state_kept(self) -> Iterator[None]:
        """Give the streams back, after the block, the state they had before it: the counts, the kept
        features, the next location and the caches' contents, copied back into the caches' own storage
        (captured graphs point at it). A capture steps placeholder streams through that state."""
        caches = (self._cls_cache, self._loc_cache)
        counts, feats, nxt = (self.t, self.frames), list(self._feats), self._next.clone()
        kept = [(c.length, None if c.keys is None else (c.keys.clone(), c.values.clone())) for c in caches]
        try:
            yield
        finally:
            (self.t, self.frames), self._feats, self._next = counts, feats, nxt
            for cache, (length, contents) in zip(caches, kept, strict=True):
                cache.length = length
                if contents is not None:
                    cache.keys.copy_(contents[0])
                    cache.values.copy_(contents[1])

    def _capture(self, frame: torch.Tensor) -> None:
        """Record one graph per step t (0..T-1) on placeholder streams (the streams' own state is kept);
        the caches keep fixed storage."""
        with self._state_kept():
            self._record(frame)

    def _record(self, frame: torch.Tensor) -> None:
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
                logits, nxt, feat = self._compute(self._static_frame, self._static_loc)
                self._static_loc.copy_(nxt)
            pool = graph.pool()
            self._graphs.append((graph, (loc, logits, nxt, feat)))


class StepGraph(torch.nn.Module):
    """The online step as one fixed-shape function, for export (ONNX): no Python state. The state is the
    last T glimpse features, the number of frames seen, the next location and T_c's and T_l's KV caches:

        (frame (B, 3, S, S) or crop (B, 3, h, w), features (B, T, D), count (1,) int64, location (B, 2),
         cls_cache, loc_cache (2, depth, B, heads, T, head_dim): keys and values of T_c, of T_l)
        -> (probs (B, C), glimpse_location (B, 2), next_location (B, 2), next_box (B, 4) int64,
            next_features, next_count, next_cls_cache, next_loc_cache: the state for the next call)

    A new stream starts from zeros (`new_state`): with `count` 0 the glimpse is taken at the learned first
    location whatever `location` holds. With `crop` the image is the box of `glimpse_read_box` at that
    location (`next_box` of the step before; for a new stream `first_box()`), as `OnlinePredictor.step(crop=...)`
    takes it. While `count` < T, T_c and T_l take the new glimpse feature as one token against their
    caches (`SlotKVCache`), what `OnlinePredictor` computes; from the T-th frame on they re-run over the
    last T features at positions 1..T, what `OnlinePredictor(context="sliding")` computes (the caches
    then pass through unchanged). The two paths are the branches of one `torch.cond` (an ONNX `If`).
    """

    def __init__(self, model: GliTr, crop: bool = False) -> None:
        super().__init__()
        self.model = model.eval()
        self.crop = crop

    def first_box(self, batch_size: int = 1) -> torch.Tensor:
        """(B, 4) int64: the box a new stream's first glimpse reads."""
        s = self.model.img_size
        return glimpse_read_box(
            self.model.initial_location(batch_size).detach(), (s, s), self.model.backbone.glimpse_scale
        )

    def new_state(self, batch_size: int = 1) -> dict[str, torch.Tensor]:
        """A new stream's state, zeros: features, count, location, cls_cache, loc_cache."""
        model, t = self.model, self.model.num_frames

        def cache(module: torch.nn.Module) -> torch.Tensor:
            attn = module.blocks[0].attn
            return torch.zeros(2, module.depth, batch_size, attn.num_heads, t, attn.head_dim)

        return {
            "features": torch.zeros(batch_size, t, model.backbone.embed_dim),
            "count": torch.zeros(1, dtype=torch.long),
            "location": torch.zeros(batch_size, 2),
            "cls_cache": cache(model.classifier),
            "loc_cache": cache(model.locator),
        }

    def forward(
        self,
        image: torch.Tensor,
        features: torch.Tensor,
        count: torch.Tensor,
        location: torch.Tensor,
        cls_cache: torch.Tensor,
        loc_cache: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        model = self.model
        t, s = model.num_frames, model.img_size
        loc = torch.where(count == 0, model.initial_location(image.shape[0]), location)  # (B, 2)
        if self.crop:
            backbone, side = model.backbone, model.backbone.glimpse_pixels
            box = glimpse_read_box(loc, (s, s), backbone.glimpse_scale)
            scale = backbone.glimpse_scale
            if backbone.separable_sampling:
                glimpses = extract_glimpse_separable(image, loc, (side, side), scale, (s, s), box[:, :2])
            else:
                glimpses = extract_glimpse_from_box(image, box, loc, (s, s), (side, side), scale)
            feat = backbone.encode_glimpses(glimpses, loc)  # (B, D)
        else:
            feat = model.backbone(image, loc)  # (B, D)
        slots = torch.arange(t, device=image.device)[None, :, None]  # (1, T, 1)
        written = torch.where(slots == count, feat[:, None], features)  # fewer than T seen: fill slot `count`
        shifted = torch.cat([features[:, 1:], feat[:, None]], dim=1)  # T seen: drop the oldest
        features = torch.where(count >= t, shifted, written)  # (B, T, D)

        def cached(
            feat: torch.Tensor, features: torch.Tensor, count: torch.Tensor, cls: torch.Tensor, lc: torch.Tensor
        ) -> tuple[torch.Tensor, ...]:
            cls_slots, loc_slots = SlotKVCache(cls[0], cls[1], count), SlotKVCache(lc[0], lc[1], count)
            logits = model.classifier.step(feat, cls_slots)  # (B, C)
            nxt = model.locator.step(feat, loc_slots)  # (B, 2)
            return logits, nxt, torch.stack(cls_slots.stacked()), torch.stack(loc_slots.stacked())

        def sliding(
            feat: torch.Tensor, features: torch.Tensor, count: torch.Tensor, cls: torch.Tensor, lc: torch.Tensor
        ) -> tuple[torch.Tensor, ...]:
            logits, nxt = model.classifier(features)[:, -1], model.locator(features)[:, -1]
            # both branches return new tensors of the same layout: no views (of the inputs or each other)
            fresh = [x.clone(memory_format=torch.contiguous_format) for x in (logits, nxt, cls, lc)]
            return tuple(fresh)

        logits, nxt, cls_cache, loc_cache = torch.cond(
            count[0] < t, cached, sliding, (feat, features, count, cls_cache, loc_cache)
        )
        box = glimpse_read_box(nxt, (s, s), model.backbone.glimpse_scale)
        return logits.softmax(dim=-1), loc, nxt, box, features, count + 1, cls_cache, loc_cache
