import numpy as np
import pytest
import torch
from model_helpers import clips, tiny_glitr

from glitr_cli.data.toy import ToyConfig, render_clip, sample_clip
from glitr_cli.data.transforms import CentreCrop, eval_transform
from glitr_cli.data.video import encode_video, iter_video_frames
from glitr_cli.errors import GlitrError
from glitr_cli.model import OnlinePredictor


def _stream(model, x):
    predictor = OnlinePredictor(model, batch_size=x.shape[0])
    steps = [predictor.step(x[:, t]) for t in range(x.shape[1])]
    return torch.stack([s.location for s in steps], 1), torch.stack([s.logits for s in steps], 1), steps


def test_online_predictor_reproduces_the_batched_student_float64():
    model = tiny_glitr().double()
    x = clips(batch=3).double()
    locs, logits, steps = _stream(model, x)
    with torch.no_grad():
        out = model.forward_student(x)
    torch.testing.assert_close(locs, out.locs, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(logits, out.logits, rtol=1e-10, atol=1e-10)
    for a, b in zip(steps[:-1], steps[1:], strict=False):
        torch.testing.assert_close(a.next_location, b.location)
    torch.testing.assert_close(steps[0].probs.sum(-1), torch.ones(3, dtype=torch.float64))


def test_online_predictor_float32_on_smooth_frames():
    model = tiny_glitr()
    x = clips(smooth=True)
    locs, logits, _ = _stream(model, x)
    with torch.no_grad():
        out = model.forward_student(x)
    torch.testing.assert_close(locs, out.locs, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits, out.logits, rtol=1e-4, atol=1e-4)


def test_streams_are_independent_and_bounded():
    model = tiny_glitr()
    x = clips(batch=2)
    _, both, _ = _stream(model, x)
    _, first, _ = _stream(model, x[:1])
    torch.testing.assert_close(both[:1], first, rtol=1e-5, atol=1e-5)
    predictor = OnlinePredictor(model)
    for t in range(model.num_frames):
        predictor.step(x[:1, t])
    with pytest.raises(GlitrError, match="trained for 5 steps"):
        predictor.step(x[:1, 0])
    predictor.reset(2)
    assert predictor.step(x[:, 0]).probs.shape == (2, 4)


def test_unknown_context_is_a_user_error():
    with pytest.raises(GlitrError, match="unknown context 'forever'"):
        OnlinePredictor(tiny_glitr(), context="forever")


@pytest.mark.parametrize("context", ["sliding", "restart"])
def test_context_modes_equal_the_bounded_predictor_for_t_steps(context):
    model = tiny_glitr().double()
    x = clips(batch=2).double()
    locs, logits, _ = _stream(model, x)
    predictor = OnlinePredictor(model, batch_size=2, context=context)
    outs = [predictor.step(x[:, t]) for t in range(x.shape[1])]
    torch.testing.assert_close(torch.stack([o.location for o in outs], 1), locs, rtol=0, atol=0)
    torch.testing.assert_close(torch.stack([o.logits for o in outs], 1), logits, rtol=0, atol=0)


def test_restart_equals_a_reset_after_t_steps():
    model = tiny_glitr()
    t = model.num_frames
    x = clips(batch=2, frames=2 * t + 2)
    predictor = OnlinePredictor(model, batch_size=2, context="restart")
    outs = [predictor.step(x[:, i]) for i in range(x.shape[1])]
    reference = OnlinePredictor(model, batch_size=2)
    for i, out in enumerate(outs):
        if i % t == 0:
            reference.reset(2)
        ref = reference.step(x[:, i])
        torch.testing.assert_close(out.location, ref.location, rtol=0, atol=0)
        torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=0)
    assert (predictor.frames, predictor.t) == (2 * t + 2, 2)
    first = model.initial_location(2)
    torch.testing.assert_close(outs[t - 1].next_location, first, rtol=0, atol=0)  # says where the new window looks


def test_sliding_runs_the_heads_over_the_last_t_features():
    """After T steps each frame's glimpse feature joins the last T-1 ones, and T_c and T_l run over
    those T at positions 1..T: checked against T_f, T_c and T_l called directly, float64."""
    model = tiny_glitr().double()
    t = model.num_frames
    x = clips(batch=2, frames=3 * t).double()
    predictor = OnlinePredictor(model, batch_size=2, context="sliding")
    outs = [predictor.step(x[:, i]) for i in range(x.shape[1])]
    assert (predictor.frames, predictor.t) == (3 * t, t)
    with torch.no_grad():
        feats = torch.stack([model.backbone(x[:, i], out.location) for i, out in enumerate(outs)], 1)  # (B, 3T, D)
        for i in range(t, 3 * t):
            window = feats[:, i - t + 1 : i + 1]  # (B, T, D)
            torch.testing.assert_close(outs[i].logits, model.classifier(window)[:, -1], rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(outs[i].next_location, model.locator(window)[:, -1], rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(outs[i].location, outs[i - 1].next_location, rtol=0, atol=0)
    assert all(torch.isfinite(o.probs).all() for o in outs)


@pytest.mark.parametrize("context", ["sliding", "restart"])
def test_glimpse_only_input_equals_full_frames(tmp_path, context):
    """Two real encoded clips (toy renders, VP9, 64x48 so the centre crop has both offsets) fed as whole
    frames and as the source pixels of `next_box()` alone: the same locations and probabilities."""
    cfg = ToyConfig(num_frames=12, size=64, distractors=2)
    videos = []
    for seed, (shape, direction) in enumerate([("square", "left"), ("ring", "down")]):
        frames = render_clip(sample_clip(np.random.default_rng(seed), cfg, shape, direction), cfg)[:, 8:56]
        path = encode_video(tmp_path / f"{seed}.webm", frames, "vp9", fps=12)
        videos.append(np.stack(list(iter_video_frames(path))))
    source = torch.from_numpy(np.stack(videos)).permute(0, 1, 4, 2, 3)  # (2, 12, 3, 48, 64) uint8
    model = tiny_glitr(img_size=40)
    size, resize = model.img_size, 48
    geometry = CentreCrop.of(64, 48, size, resize)
    assert (geometry.left, geometry.top) == (12, 4)
    transform = eval_transform(size, resize)
    full = OnlinePredictor(model, batch_size=2, context=context)
    glimpse_only = OnlinePredictor(model, batch_size=2, context=context)
    read = 0
    for t in range(source.shape[1]):
        a = full.step(transform(source[:, t]))
        boxes = glimpse_only.next_box()
        crops = []
        for i, box in enumerate(boxes.tolist()):
            x0, y0, x1, y1 = geometry.source_box(box)
            read += (x1 - x0) * (y1 - y0)
            crops.append(geometry.model_pixels(source[i, t, :, y0:y1, x0:x1], box))
        b = glimpse_only.step(crop=torch.stack(crops))
        torch.testing.assert_close(b.location, a.location, atol=1e-5, rtol=0)
        torch.testing.assert_close(b.probs, a.probs, atol=1e-5, rtol=0)
    assert read < source.shape[0] * source.shape[1] * size * size  # fewer pixels than the model inputs
    with pytest.raises(GlitrError, match="expected the crops of next_box"):
        glimpse_only.step(crop=torch.zeros(2, 3, size, size))
    with pytest.raises(GlitrError, match="short side must be the evaluation resize"):
        CentreCrop.of(64, 40, size, resize)


@pytest.mark.parametrize("context", [None, "sliding", "restart"])
def test_what_a_capture_runs_between_two_steps_leaves_the_streams_state(context):
    """On CUDA the first whole-frame step after eager (crop) steps captures the graphs, which steps
    placeholder streams through the predictor's state and caches; `_state_kept` gives the streams
    their state back. Here on the CPU what a capture does (a reset, T steps) runs eagerly inside it,
    once during the first window and, with a context, once after it: the streams go on as if nothing
    had run between their steps."""
    model = tiny_glitr()
    n = 8 if context else model.num_frames
    x, placeholder = clips(frames=n, smooth=True), clips(seed=1, smooth=True)
    plain = OnlinePredictor(model, batch_size=2, context=context)
    interrupted = OnlinePredictor(model, batch_size=2, context=context)
    for t in range(n):
        if t in (2, 6):
            with interrupted._state_kept():
                interrupted.reset(2)
                for s in range(model.num_frames):
                    interrupted.step(placeholder[:, s])
        a, b = plain.step(x[:, t]), interrupted.step(x[:, t])
        assert torch.equal(b.logits, a.logits) and torch.equal(b.next_location, a.next_location), t
        assert (interrupted.t, interrupted.frames) == (plain.t, plain.frames)
