"""`glitr predict` and `glitr visualize` decode a video once, though they learn its number of frames
only by decoding it: a spy on PyAV's real decoder counts the frames it gives."""

from __future__ import annotations

from pathlib import Path

import av
import pytest
import torch
from data_helpers import encode_video, make_frames

from glitr_cli.data import video as video_module
from glitr_cli.engine.loading import load_student
from glitr_cli.engine.online import visualize
from glitr_cli.engine.predict import read_clip

FRAMES = 23


class _Counting:
    """A real PyAV container that counts the frames its decoder gives in `decoded`."""

    def __init__(self, container: av.container.InputContainer, decoded: list[str]) -> None:
        self._container, self._decoded = container, decoded

    def __getattr__(self, name: str) -> object:
        return getattr(self._container, name)

    def __enter__(self) -> _Counting:
        return self

    def __exit__(self, *exc: object) -> None:
        self._container.close()

    def decode(self, *streams: object):
        for frame in self._container.decode(*streams):
            self._decoded.append(self._container.name)
            yield frame


@pytest.fixture()
def decoded(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The file name of every frame PyAV decodes while the test runs."""
    frames: list[str] = []
    real = av.open
    monkeypatch.setattr(av, "open", lambda *args, **kwargs: _Counting(real(*args, **kwargs), frames))
    return frames


@pytest.fixture()
def video(tmp_path: Path) -> Path:
    return encode_video(tmp_path / "clip.mp4", make_frames(FRAMES, 48, 64), "h264")


def test_predict_decodes_a_video_once(trained_tiny, video, decoded):
    sampler = load_student(trained_tiny / "runs/tiny/checkpoints/last.pt").sampler
    clip = read_clip(video, sampler)
    assert clip.shape[0] == sampler.num_segments == 4
    assert decoded == [str(video)] * FRAMES


def test_visualize_decodes_a_video_once(trained_tiny, video, tmp_path, decoded):
    result = visualize(video, checkpoint=trained_tiny / "runs/tiny/checkpoints/last.pt", out=tmp_path / "v.gif")
    assert len(result["frames"]) == 4
    assert decoded.count(str(video)) == FRAMES  # (the GIF is written by Pillow, not decoded)


def test_a_video_too_long_to_hold_is_decoded_again_for_the_same_frames(trained_tiny, video, decoded, monkeypatch):
    """Past `KEEP_DECODED_BYTES` of decoded frames, the first pass only counts them and a second one takes
    the chosen frames (up to the last of them): the same clip, in bounded memory."""
    sampler = load_student(trained_tiny / "runs/tiny/checkpoints/last.pt").sampler
    once = read_clip(video, sampler)
    monkeypatch.setattr(video_module, "KEEP_DECODED_BYTES", 1)
    decoded.clear()
    twice = read_clip(video, sampler)
    assert torch.equal(once, twice)
    last = max(sampler.indices(FRAMES, train=False))
    assert decoded == [str(video)] * (FRAMES + last + 1)
