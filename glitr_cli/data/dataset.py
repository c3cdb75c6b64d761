"""Frame-folder video dataset (the TSM layout): a list record -> frame indices (`data.sampling`) -> the
JPEGs decoded (torchvision's libjpeg-turbo, Pillow's pixels; a missing or corrupt frame replaced by its
nearest readable neighbour and counted) -> uint8 clip (T, 3, H, W) -> transform. With `encoded=True`
(`data.decode_on: device`) an item holds the JPEG bytes (`JpegClip`) and the training process decodes
the batch on its device (`VideoFolderDataset.decode`).
"""

from __future__ import annotations

import difflib
import functools
import io
import logging
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from glitr_cli.data.formats import DATASETS, DatasetInfo, VideoRecord, read_categories, read_dataset_info, read_list
from glitr_cli.data.sampling import FrameSampler, Sampling
from glitr_cli.data.transforms import clip_train_transform, eval_transform
from glitr_cli.errors import GlitrError
from glitr_cli.recipe import DataConfig

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")

try:
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_jpeg as _tv_decode_jpeg
except ImportError:  # torchvision's image codecs are deprecated since 0.29
    _tv_decode_jpeg = None


def _decode_pillow(data: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as im:
        arr = np.array(im.convert("RGB"))
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def decode_jpegs(files: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Decode JPEG files (1-D uint8 tensors of their bytes, on the CPU) in one call on `device`:
    uint8 (3, H, W) each, RGB (nvJPEG on CUDA). Raises when any of them cannot be decoded.

    On CUDA the decoder runs on a stream of its own: nvJPEG's hardware engine may write its outputs
    before the work queued on the caller's stream has run (pytorch/vision#9606), so its outputs come
    from memory that stream never hands out while the caller's stream still uses it
    (`record_stream`), and the caller's stream waits for the decode."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        if device.type != "cuda":
            return _tv_decode_jpeg(files, mode=ImageReadMode.RGB, device=device)
        caller, own = torch.cuda.current_stream(device), _decode_stream(device)
        own.wait_stream(caller)
        with torch.cuda.stream(own):
            frames = _tv_decode_jpeg(files, mode=ImageReadMode.RGB, device=device)
    caller.wait_stream(own)
    for frame in frames:
        frame.record_stream(caller)
    return frames


@functools.cache
def _decode_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


def decode_jpeg_bytes(data: bytes, backend: str = "auto") -> torch.Tensor:
    """Decode JPEG bytes to a uint8 tensor (3, H, W), RGB. Raises on corrupt data.

    `backend`: "torchvision", "pillow" or "auto" (torchvision when available)."""
    if not data:
        raise ValueError("empty file")
    if backend == "pillow" or (backend == "auto" and _tv_decode_jpeg is None):
        return _decode_pillow(data)
    return decode_jpegs([torch.frombuffer(bytearray(data), dtype=torch.uint8)], torch.device("cpu"))[0]


class JpegClip(NamedTuple):
    """A clip's frames as their JPEG files (`VideoFolderDataset(encoded=True)`): `data` the files'
    bytes one after another, `sizes` the byte count of each (0: the file could not be read), `clip`
    the dataset index and `indices` the 0-based frames. `VideoFolderDataset.decode` decodes it."""

    clip: int
    indices: list[int]
    data: torch.Tensor  # uint8 (sum(sizes),)
    sizes: list[int]


def _prepare_hint(root: Path, name: str | None) -> str:
    """The command that prepares dataset `name` (from its glitr_dataset.json, or `root`'s name) into `root`:
    your own clips unless the name is one `prepare-data` knows."""
    if name not in DATASETS:
        name = root.name if root.name in DATASETS else None
    return f"glitr prepare-data {name} --out {root}" if name else f"glitr prepare-data folder --src DIR --out {root}"


def _no_dataset(root: Path) -> str:
    """Why there is no dataset at `root` to read, the prepared ones beside it (the closest name first)
    and the command that prepares one there."""
    folders = root.parent.iterdir() if root.parent.is_dir() else []
    beside = sorted(p.name for p in folders if (p / "category.txt").is_file())
    close = difflib.get_close_matches(root.name, beside, n=1)
    meant = f"did you mean {root.parent / close[0]}? " if close else ""
    others = f"prepared in {root.parent}: {', '.join(beside)}; " if beside else ""
    return f"no dataset at {root} (data.dataset, data.root); {meant}{others}prepare one: {_prepare_hint(root, None)}"


class VideoFolderDataset(Dataset):
    """A prepared dataset: `<root>/{split}_videofolder.txt`, `<root>/category.txt` and JPEG frames at
    `<root>/<frames_dir>/<id>/<template % i>` (i 1-based; `glitr_dataset.json` may move them, as for
    in-place Jester). An item is `(transform(uint8 clip (T, 3, H, W)), label)` (label -1 for the unlabelled
    test split; with `encoded`, the clip's `JpegClip`); clips shorter than `min_frames` are left out and
    counted in `dropped_clips`. Unreadable frames are replaced by the nearest readable frame of the video (a
    black clip when none is) and counted per clip in `damage` (clip index -> [frames replaced, times
    unreadable]), in shared memory so that the loader workers' counts reach the training process."""

    def __init__(
        self,
        root: Path | str,
        split: str,
        num_frames: int,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        train: bool = False,
        sampling: Sampling = "original",
        min_frames: int = 1,
        encoded: bool = False,
    ) -> None:
        root = Path(root)
        if split not in SPLITS:
            raise GlitrError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        if num_frames < 1:
            raise GlitrError(f"num_frames must be at least 1, got {num_frames}")
        info = read_dataset_info(root) if root.is_dir() else None
        list_path = root / f"{split}_videofolder.txt"
        cat_path = root / "category.txt"
        for p in (list_path, cat_path):
            if not p.is_file():
                hint = _prepare_hint(root, info and info.name)
                raise GlitrError(f"{root} is not a prepared dataset (missing {p.name}): run `{hint}`")
        self.root = root
        self.split = split
        self.num_frames = num_frames
        self.sampler = FrameSampler(num_frames, sampling)
        self.transform = transform
        self.train = train
        if encoded and _tv_decode_jpeg is None:
            raise GlitrError("data.decode_on=device needs torchvision's decode_jpeg, which this torchvision lacks")
        self.encoded = encoded
        self.info = info or DatasetInfo(name=root.name)
        frames_dir = Path(self.info.frames_dir)
        self.frames_dir = frames_dir if frames_dir.is_absolute() else root / frames_dir
        self.template = self.info.template
        self.class_names: list[str] = read_categories(cat_path)
        self.num_classes = len(self.class_names)
        listed = read_list(list_path, self.num_classes)
        self.records: list[VideoRecord] = [r for r in listed if r.num_frames >= min_frames]
        self.dropped_clips = len(listed) - len(self.records)
        if not self.records:
            raise GlitrError(f"{list_path}: lists no videos with at least {min_frames} frames")
        if not self.frames_dir.is_dir():
            raise GlitrError(
                f"{root}: frame folder {self.frames_dir} is missing: run `{_prepare_hint(root, self.info.name)}`"
            )
        self.damage = torch.zeros(len(self.records), 2, dtype=torch.int32).share_memory_()
        self._fallback_hw = (256, 256)
        self._logged = 0

    def __len__(self) -> int:
        return len(self.records)

    def frame_path(self, record: VideoRecord, index: int) -> Path:
        """Path of 0-based frame `index` of a video."""
        return self.frames_dir / record.id / (self.template % (index + 1))

    def _read(self, path: Path) -> torch.Tensor | None:
        try:
            return decode_jpeg_bytes(path.read_bytes())
        except (OSError, RuntimeError, ValueError) as e:  # missing, unreadable, corrupt
            if self._logged < 10:
                self._logged += 1
                log.warning(
                    "unreadable frame %s (%s); using the nearest readable one", path, str(e).splitlines()[0][:80]
                )
            return None

    def load_frames(self, clip: int, indices: list[int]) -> torch.Tensor:
        """Decode the frames at 0-based `indices` of clip `clip`: uint8 (T, 3, H, W); damage is counted."""
        record = self.records[clip]
        cache: dict[int, torch.Tensor | None] = {}

        def get(i: int) -> torch.Tensor | None:
            if i not in cache:
                cache[i] = self._read(self.frame_path(record, i))
            return cache[i]

        out: list[torch.Tensor | None] = []
        for i in indices:
            img = get(i)
            if img is None:
                for d in range(1, record.num_frames):
                    for j in (i - d, i + d):
                        if 0 <= j < record.num_frames and (img := get(j)) is not None:
                            break
                    if img is not None:
                        break
                self.damage[clip, 0] += 1
            out.append(img)
        found = [x for x in out if x is not None]
        if not found:
            self.damage[clip, 1] += 1
            h, w = self._fallback_hw
            return torch.zeros(len(indices), 3, h, w, dtype=torch.uint8)
        self._fallback_hw = tuple(found[0].shape[-2:])
        return torch.stack([x if x is not None else found[0] for x in out])  # (T, 3, H, W)

    def read_files(self, clip: int, indices: list[int]) -> JpegClip:
        """The JPEG files of the frames at 0-based `indices` of clip `clip`, undecoded (one that cannot
        be read is empty: `decode` finds it)."""
        record = self.records[clip]
        files = []
        for i in indices:
            try:
                files.append(self.frame_path(record, i).read_bytes())
            except OSError:
                files.append(b"")
        data = torch.from_numpy(np.frombuffer(bytearray(b"".join(files)), dtype=np.uint8))
        return JpegClip(clip, indices, data, [len(f) for f in files])

    def decode(self, clips: Sequence[JpegClip], device: torch.device) -> list[torch.Tensor]:
        """Decode `clips` (items of `encoded=True`) on `device`, all frames in one call (nvJPEG on
        CUDA): uint8 (T, 3, H, W) each. When a file fails, the batch is decoded clip by clip and a
        clip with a file that cannot be decoded is read as the loader reads it (`load_frames`, on the
        CPU: the file replaced by its nearest readable frame, and counted in `damage`); running out
        of device memory is no file's fault and raises."""
        try:
            frames = iter(decode_jpegs([f for c in clips for f in c.data.split(c.sizes)], device))
        except torch.OutOfMemoryError:  # not the files' fault
            raise
        except (RuntimeError, ValueError):  # an unreadable file somewhere in the batch
            return [self._decode_clip(c, device) for c in clips]
        return [torch.stack([next(frames) for _ in c.sizes]) for c in clips]

    def _decode_clip(self, clip: JpegClip, device: torch.device) -> torch.Tensor:
        try:
            return torch.stack(decode_jpegs(list(clip.data.split(clip.sizes)), device))
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, ValueError):
            return self.load_frames(clip.clip, clip.indices).to(device)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | JpegClip, int]:
        record = self.records[i]
        indices = self.sampler.indices(record.num_frames, self.train)
        label = -1 if record.label is None else record.label
        if self.encoded:
            return self.read_files(i, indices), label
        clip = self.load_frames(i, indices)  # (T, 3, H, W) uint8
        if self.transform is not None:
            clip = self.transform(clip)
        return clip, label


def build_dataset(cfg: DataConfig, split: str, *, train: bool) -> VideoFolderDataset:
    """The clips of `split` under `cfg.root` (resolve the recipe first) with the recipe's frame sampling
    and its training or evaluation transform; training leaves out clips shorter than
    `cfg.min_train_frames` (counted in `dropped_clips`). Training clips stay uint8 when `cfg.augment_on` is
    "device" (the training step transforms them), and JPEG files (`JpegClip`) when `cfg.decode_on` is
    "device". A missing or unprepared dataset names `glitr prepare-data`."""
    assert cfg.root is not None, "resolve the recipe first"
    if not Path(cfg.root).is_dir():
        raise GlitrError(_no_dataset(Path(cfg.root)))
    if train:
        transform = None if cfg.augment_on == "device" else clip_train_transform(cfg)
    else:
        transform = eval_transform(cfg.img_size, cfg.resize)
    return VideoFolderDataset(
        cfg.root,
        split,
        num_frames=cfg.num_frames,
        transform=transform,
        train=train,
        sampling=cfg.sampling,
        min_frames=cfg.min_train_frames if train else 1,
        encoded=train and cfg.decode_on == "device",
    )
