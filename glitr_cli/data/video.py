"""Video files in and out, all through PyAV: decoding any container and codec into RGB frames,
encoding frames (the toy generator, `glitr visualize`, the tests), and reading a video file or a
folder of JPEG/PNG frames frame by frame (`FrameSource`).

Frames are uint8 numpy arrays (H, W, 3), RGB.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Any

import av
import numpy as np
from PIL import Image

from glitr_cli.errors import GlitrError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# decoded frames `FrameSource.sample` holds to decode a video once (some 340 frames of 1080p); past it, twice
KEEP_DECODED_BYTES = 1 << 30

# name -> (container format, encoder, default encoder options)
CODECS: dict[str, tuple[str, str, dict[str, str]]] = {
    "vp9": ("webm", "libvpx-vp9", {"crf": "20", "b:v": "0", "deadline": "realtime", "cpu-used": "8"}),
    "vp8": ("webm", "libvpx", {"crf": "10", "b:v": "1M", "deadline": "realtime", "cpu-used": "8"}),
    "h264": ("mp4", "libx264", {"crf": "18"}),
    "h264-mkv": ("matroska", "libx264", {"crf": "18", "preset": "ultrafast"}),
    "mpeg4": ("avi", "mpeg4", {"qscale": "3"}),
}


# ------------------------------------------------------------------------------------------------ decoding


def _av_reason(e: BaseException) -> str:
    msg = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return " ".join(str(msg).split())


def resized_size(w: int, h: int, short_side: int | None) -> tuple[int, int]:
    """(width, height) after resizing so the shorter side is `short_side` (None: unchanged)."""
    if short_side is None or min(w, h) == short_side:
        return w, h
    if h <= w:
        return max(1, round(w * short_side / h)), short_side
    return short_side, max(1, round(h * short_side / w))


def iter_video_frames(
    path: Path | str, short_side: int | None = None, check_complete: bool = True
) -> Iterator[np.ndarray]:
    """Decode any PyAV-readable video file, yielding RGB frames as uint8 arrays (H, W, 3).

    `short_side` resizes (bicubic) so the shorter side has that many pixels. With
    `check_complete`, a file whose decoded frames cover clearly less than the duration
    its header announces (a truncated download) raises. Every failure raises `GlitrError`
    naming the file."""
    size: list[tuple[int, int]] = []  # the first frame's, resized

    def rgb(frame: av.VideoFrame) -> np.ndarray:
        if not size:
            size.append(resized_size(frame.width, frame.height, short_side))
        return to_rgb(frame, size[0])

    return _decoded(Path(path), rgb, check_complete)


# Scale on the calling thread: from PyAV 17 on, swscale starts threads of its own by default, and a
# loader worker forked from a process that had scaled frames waits for them forever.
SCALE_ON_ONE_THREAD = {"threads": 1} if int(av.__version__.split(".")[0]) >= 17 else {}


def to_rgb(frame: av.VideoFrame, size: tuple[int, int]) -> np.ndarray:
    """A decoded frame as RGB uint8 (H, W, 3) of `size` (width, height), resized bicubic."""
    return frame.to_ndarray(
        format="rgb24", width=size[0], height=size[1], interpolation="BICUBIC", **SCALE_ON_ONE_THREAD
    )


def _decoded(path: Path, convert: Callable[[av.VideoFrame], Any], check_complete: bool) -> Iterator[Any]:
    """`convert` of every decoded frame of the video file `path`; failures as in `iter_video_frames`."""
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as e:
        raise GlitrError(f"{path}: cannot open as a video ({_av_reason(e)})") from None
    with container:
        if not container.streams.video:
            raise GlitrError(f"{path}: cannot open as a video (it has no video stream)")
        stream = container.streams.video[0]
        n = 0
        first_t = last_t = None
        try:
            for frame in container.decode(stream):
                converted = convert(frame)
                if frame.time is not None:
                    first_t = frame.time if first_t is None else first_t
                    last_t = frame.time
                n += 1
                yield converted
        except av.FFmpegError as e:
            raise GlitrError(f"{path}: decoding failed after {n} frames ({_av_reason(e)})") from None
        if n == 0:
            raise GlitrError(f"{path}: no video frames could be decoded")
        if check_complete:
            _check_complete(path, container, stream, n, first_t, last_t)


def _check_complete(
    path: Path, container: Any, stream: Any, n: int, first_t: float | None, last_t: float | None
) -> None:
    # A container cut short often still opens and decodes a prefix without any error
    # (WebM, Matroska, AVI), so compare what was decoded with what the header announces.
    expected = stream.frames or 0
    if expected > 0 and n < 0.9 * expected and expected - n > 2:
        raise GlitrError(f"{path}: truncated: decoded {n} of the {expected} frames its header announces")
    rate = stream.average_rate or stream.guessed_rate
    if not rate or first_t is None or last_t is None:
        return
    total = None
    if stream.duration and stream.time_base:
        total = float(stream.duration * stream.time_base)
    elif container.duration and len(container.streams) == 1:
        total = container.duration / 1_000_000
    if not total:
        return
    step = 1.0 / float(rate)
    covered = last_t - first_t + step
    if covered < 0.9 * total and total - covered > 2.5 * step:
        raise GlitrError(f"{path}: truncated: {n} decoded frames cover {covered:.2f} s of the {total:.2f} s announced")


def iter_folder_frames(folder: Path | str, short_side: int | None = None) -> Iterator[np.ndarray]:
    """The images of a frame folder (`image_files` order), as `read_image` reads them."""
    for path in image_files(Path(folder)):
        yield read_image(path, short_side)


def iter_clip_frames(path: Path | str, short_side: int | None = None) -> Iterator[np.ndarray]:
    """The frames of a clip: a video file (`iter_video_frames`) or a folder of images (`iter_folder_frames`)."""
    if Path(path).is_dir():
        return iter_folder_frames(path, short_side)
    return iter_video_frames(path, short_side)


# ------------------------------------------------------------------------------------------------ encoding


class VideoWriter:
    """Encode RGB frames one at a time (long videos need no memory) with one of `CODECS`.

    The first frame fixes the size; for the encoders that need even sides (H.264, MPEG-4) an odd
    side is padded with one black row or column; VP8/VP9 keep it. `options` update the codec's
    defaults; `bitexact` keeps random ids and dates out of the header and `threads` fixes the
    encoder's threads, so the same frames give the same bytes.
    The container format is explicit, so the file name's extension does not matter.
    """

    def __init__(
        self,
        path: str | Path,
        fps: float,
        codec: str = "h264",
        options: dict[str, str] | None = None,
        bitexact: bool = False,
        threads: int = 0,
    ) -> None:
        fmt, self._encoder, defaults = CODECS[codec]
        self._options = {**defaults, **(options or {})}
        self._threads = threads
        self._rate = Fraction(fps).limit_denominator(1000)
        self.container = av.open(str(path), "w", format=fmt, options={"fflags": "+bitexact"} if bitexact else {})
        self.stream: Any = None
        self._even = self._encoder not in ("libvpx", "libvpx-vp9")

    def write(self, frame: np.ndarray) -> None:
        """Append one uint8 frame (H, W, 3)."""
        h, w = frame.shape[:2]
        pad_h, pad_w = (h % 2, w % 2) if self._even else (0, 0)
        if self.stream is None:
            self.stream = self.container.add_stream(self._encoder, rate=self._rate)
            self.stream.width, self.stream.height = w + pad_w, h + pad_h
            self.stream.pix_fmt = "yuv420p"
            self.stream.options = dict(self._options)
            if self._threads:
                self.stream.codec_context.thread_count = self._threads
        if (w + pad_w, h + pad_h) != (self.stream.width, self.stream.height):
            raise ValueError(f"frame of {w}x{h} in a video of {self.stream.width}x{self.stream.height}")
        if pad_h or pad_w:
            frame = np.pad(frame, ((0, pad_h), (0, pad_w), (0, 0)))
        video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        for packet in self.stream.encode(video_frame):
            self.container.mux(packet)

    def close(self) -> None:
        """Flush the encoder and close the file."""
        if self.stream is not None:
            for packet in self.stream.encode():
                self.container.mux(packet)
        self.container.close()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def encode_video(path: str | Path, frames: np.ndarray, codec: str = "vp9", fps: float = 12, **options: Any) -> Path:
    """Encode frames (T, H, W, 3) uint8 into `path`; `options` are `VideoWriter`'s."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with VideoWriter(path, fps, codec, **options) as writer:
        for frame in frames:
            writer.write(frame)
    return path


# ------------------------------------------------------------------------------------------- frame sources


def _natural_key(path: Path) -> list[Any]:
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", path.name)]


def image_files(folder: Path) -> list[Path]:
    """The JPEG/PNG files of a frame folder in natural order (frame2 before frame10)."""
    files = sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=_natural_key)
    if not files:
        raise GlitrError(f"{folder}: a folder of frames must hold .jpg/.jpeg/.png images, found none")
    return files


def read_image(path: Path, short_side: int | None = None) -> np.ndarray:
    """One image file as RGB uint8 (H, W, 3), resized (bicubic) so the shorter side has `short_side`
    pixels; an unreadable one is a GlitrError naming it."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            size = resized_size(im.width, im.height, short_side)
            return np.array(im if size == (im.width, im.height) else im.resize(size, Image.Resampling.BICUBIC))
    except (OSError, ValueError) as e:
        raise GlitrError(f"{path}: cannot read as an image ({' '.join(str(e).split())})") from None


class FrameSource:
    """RGB uint8 frames (H, W, 3) of a video file (PyAV) or a folder of images, with their indices."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise GlitrError(f"{self.path}: no such video file or frame folder")
        self._files = image_files(self.path) if self.path.is_dir() else None

    def frames(self) -> Iterator[tuple[int, np.ndarray]]:
        """(index, frame) for every frame in order."""
        frames = map(read_image, self._files) if self._files is not None else iter_video_frames(self.path)
        yield from enumerate(frames)

    def sample(self, pick: Callable[[int], list[int]]) -> list[tuple[int, np.ndarray]]:
        """(index, frame) for the indices `pick` chooses (ascending, repeats allowed) from the number of
        frames, decoding a video once where it fits in `KEEP_DECODED_BYTES`.

        Headers often omit or misstate the number of frames, so it is known only once the whole video is
        decoded: its frames are kept as the decoder gives them (in a 4:2:0 video half the bytes of RGB)
        and only the chosen ones are converted. A longer video is decoded a second time to take them."""
        if self._files is not None:
            return [(i, read_image(self._files[i])) for i in pick(len(self._files))]
        kept: list[av.VideoFrame] | None = []
        n = held = 0
        size = (0, 0)  # the first frame's, which every frame is converted to
        for frame in _decoded(self.path, lambda frame: frame, check_complete=True):
            if n == 0:
                size = (frame.width, frame.height)
            n += 1
            if kept is not None:
                kept.append(frame)
                held += sum(plane.buffer_size for plane in frame.planes)
                if held > KEEP_DECODED_BYTES:
                    kept = None  # too long to hold: counted now, its frames taken in a second pass
        indices = pick(n)
        if kept is not None:
            return [(i, to_rgb(kept[i], size)) for i in indices]
        wanted = iter(indices)
        chosen, nxt = [], next(wanted, None)
        for i, frame in enumerate(_decoded(self.path, lambda frame: frame, check_complete=False)):
            while nxt == i:  # only the chosen frames are converted
                chosen.append((i, to_rgb(frame, size)))
                nxt = next(wanted, None)
            if nxt is None:
                break
        return chosen
