import pytest
import torch
from model_helpers import clips, tiny_glitr

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
