"""How soon the online predictor follows a change of action: sliding context against restart.

    python scripts/context_switch.py runs/demo/glitr/checkpoints/last.pt --pairs 40

A toy-trained GliTr (T frames per clip) watches a stream of three toy clips back to back: the
last T - phase frames of a clip of action A, then two clips of action B (a different class,
each rendered and encoded like the toy dataset), for every phase 0..T-1, so the switch falls
at every position of the restart predictor's window. For each stream and context: the delay,
the number of B frames seen (1 = the first) until the top-1 is B for the first time, and
whether the top-1 is B at each of the 2T frames after the switch. Prints the mean and median
delay, the streams where the top-1 never became B, the share of B frames classified B, and that
share at each position after the switch.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch

from glitr_cli.data.formats import template_to_class
from glitr_cli.data.toy import ToyConfig, render_clip, sample_clip, template_for
from glitr_cli.data.transforms import eval_transform
from glitr_cli.data.video import encode_video, iter_video_frames
from glitr_cli.engine.loading import load_student
from glitr_cli.model import OnlinePredictor


def toy_clip(cfg: ToyConfig, seed: int, shape: str, direction: str, folder: Path) -> np.ndarray:
    """A toy clip as the dataset holds it: rendered, encoded to VP9 like the generator, decoded."""
    frames = render_clip(sample_clip(np.random.default_rng([seed, 0x5717]), cfg, shape, direction), cfg)
    options = {"crf": "8", "row-mt": "0"}
    path = encode_video(folder / f"{seed}.webm", frames, "vp9", cfg.fps, options=options, bitexact=True, threads=1)
    return np.stack(list(iter_video_frames(path)))


def delay(top1: list[int], start: int, label: int) -> int | None:
    """B frames seen (1-based) until `top1` first is `label`; None if it never is."""
    hits = [i for i in range(start, len(top1)) if top1[i] == label]
    return hits[0] - start + 1 if hits else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--pairs", type=int, default=40, help="(A, B) pairs of clips, each at every phase")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    student = load_student(args.checkpoint)
    t = student.num_frames
    cfg = ToyConfig(num_frames=t, size=student.resize)
    names = {
        (s, d): student.class_names.index(template_to_class(template_for(s, d)))
        for s in cfg.shapes
        for d in cfg.directions
    }
    classes = list(names)
    transform = eval_transform(student.img_size, student.resize)
    rng = np.random.default_rng(args.seed)
    delays: dict[str, list[int | None]] = {"sliding": [], "restart": []}
    correct: dict[str, list[list[bool]]] = {"sliding": [], "restart": []}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for pair in range(args.pairs):
            a, b = rng.choice(len(classes), 2, replace=False)
            seeds = [args.seed * 100_000 + 3 * pair + k for k in range(3)]
            clip_a = toy_clip(cfg, seeds[0], *classes[a], Path(tmp))
            clip_b = [toy_clip(cfg, s, *classes[b], Path(tmp)) for s in seeds[1:]]
            for phase in range(t):
                stream = np.concatenate([clip_a[phase:], *clip_b])  # (N, H, W, 3)
                x = transform(torch.from_numpy(stream).permute(0, 3, 1, 2))  # (N, 3, S, S)
                start = t - phase  # the first frame of B
                label = names[classes[b]]
                for context in delays:
                    predictor = OnlinePredictor(student.model, context=context)
                    top1 = [int(predictor.step(frame[None]).probs[0].argmax()) for frame in x]
                    delays[context].append(delay(top1, start, label))
                    correct[context].append([c == label for c in top1[start:]])
    for context, ds in delays.items():
        hit = [d for d in ds if d is not None]
        per_position = np.mean(correct[context], axis=0)  # (2T,)
        print(
            f"{context}: {len(ds)} streams; first top-1 = B after mean {statistics.mean(hit):.2f}, median "
            f"{statistics.median(hit):.1f} B frames; never: {len(ds) - len(hit)}; B frames classified B: "
            f"{100 * per_position.mean():.1f} %"
        )
        print("  share classified B at B frame 1..2T:", " ".join(f"{100 * v:.0f}" for v in per_position))


if __name__ == "__main__":
    main()
