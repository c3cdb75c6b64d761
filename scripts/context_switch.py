"""How soon the online predictor follows a change of action: sliding context against restart.

    python scripts/context_switch.py runs/demo/glitr/checkpoints/last.pt --pairs 40

A toy-trained GliTr (T frames per clip) watches a stream of three toy clips back to back: the
last T - phase frames of a clip of action A, then two clips of action B (a different class,
each rendered and encoded like the toy dataset), for every phase 0..T-1, so the switch falls
at every position of the restart predictor's window. For each stream and context the delay is
the number of B frames seen (1 = the first) until the top-1 is B and stays B to the end of the
stream; a stream whose top-1 never settles on B counts as not followed. Prints the mean and
median delay of each context and the share of streams followed within T frames.
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
from glitr_cli.data.video import decode_video, encode_video
from glitr_cli.engine.loading import load_student
from glitr_cli.model import OnlinePredictor


def toy_clip(cfg: ToyConfig, seed: int, shape: str, direction: str, folder: Path) -> np.ndarray:
    """A toy clip as the dataset holds it: rendered, encoded to VP9 like the generator, decoded."""
    frames = render_clip(sample_clip(np.random.default_rng([seed, 0x5717]), cfg, shape, direction), cfg)
    options = {"crf": "8", "row-mt": "0"}
    path = encode_video(folder / f"{seed}.webm", frames, "vp9", cfg.fps, options=options, bitexact=True, threads=1)
    return np.stack(decode_video(path))


def delay(top1: list[int], start: int, label: int) -> int | None:
    """B frames seen (1-based) until `top1` is `label` from there to the end; None if it never settles."""
    settled = None
    for i in range(len(top1) - 1, start - 1, -1):
        if top1[i] != label:
            break
        settled = i
    return None if settled is None else settled - start + 1


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
                for context in delays:
                    predictor = OnlinePredictor(student.model, context=context)
                    top1 = [int(predictor.step(frame[None]).probs[0].argmax()) for frame in x]
                    delays[context].append(delay(top1, start, names[classes[b]]))
    for context, ds in delays.items():
        followed = [d for d in ds if d is not None]
        within = sum(d <= t for d in followed) / len(ds)
        print(
            f"{context}: {len(ds)} streams, delay mean {statistics.mean(followed):.2f} median "
            f"{statistics.median(followed):.1f} frames (of those followed, {len(followed)}); "
            f"followed within T={t} frames: {100 * within:.0f} %"
        )


if __name__ == "__main__":
    main()
