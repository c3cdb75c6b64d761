"""What int8 costs in accuracy: a GliTr student's float step against `glitr export --int8`'s.

    python scripts/int8_accuracy.py runs/demo/glitr/checkpoints/last.pt runs/demo/data --split val

Every clip of the prepared split goes through the evaluation transform and then, frame by frame,
through PyTorch's online predictor, the exported float32 step and the int8 one, both in ONNX Runtime
(one thread). Prints the top-1 accuracy at every step for each, how often int8's top-1 at the last step
agrees with PyTorch's, how far apart their probabilities and next locations get (largest, and the
share of steps whose next location moved by more than 0.05, 2.5 % of the frame's width), and ms per
frame.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from glitr_cli.data.dataset import VideoFolderDataset
from glitr_cli.data.transforms import eval_transform
from glitr_cli.engine.loading import load_student
from glitr_cli.engine.onnx import OnnxPredictor
from glitr_cli.model import OnlinePredictor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("data", type=Path, help="a prepared dataset folder (glitr prepare-data)")
    parser.add_argument("--split", default="val")
    args = parser.parse_args()
    torch.set_num_threads(1)

    student = load_student(args.checkpoint)
    t = student.num_frames
    dataset = VideoFolderDataset(
        args.data,
        args.split,
        num_frames=t,
        transform=eval_transform(student.img_size, student.resize),
        train=False,
        sampling=student.recipe.data.sampling,
    )
    predictors = {
        "pytorch": OnlinePredictor(student.model),
        "onnx": OnnxPredictor(student.model, threads=1),
        "onnx-int8": OnnxPredictor(student.model, threads=1, int8=True),
    }
    correct = {name: torch.zeros(t) for name in predictors}
    seconds = dict.fromkeys(predictors, 0.0)
    agree, prob_diff, loc_diffs = 0, 0.0, []
    for clip, label in dataset:
        outs = {}
        for name, predictor in predictors.items():
            predictor.reset()
            start = time.perf_counter()
            outs[name] = [predictor.step(frame[None]) for frame in clip]
            seconds[name] += time.perf_counter() - start
            correct[name] += torch.tensor([float(o.probs.argmax() == label) for o in outs[name]])
        ref, q = outs["pytorch"], outs["onnx-int8"]
        agree += int(ref[-1].probs.argmax() == q[-1].probs.argmax())
        prob_diff = max(prob_diff, max(float((a.probs - b.probs).abs().max()) for a, b in zip(ref, q, strict=True)))
        loc_diffs += [float((a.next_location - b.next_location).abs().max()) for a, b in zip(ref, q, strict=True)]
    n = len(dataset)
    print(f"{n} clips of {args.data}:{args.split}, T={t}")
    for name in predictors:
        steps = " ".join(f"{100 * c / n:.1f}" for c in correct[name].tolist())
        print(f"{name:10s} top-1 % at t=1..{t}: {steps}   {1000 * seconds[name] / (n * t):.2f} ms/frame")
    print(f"int8 top-1 at t={t} agrees with pytorch on {100 * agree / n:.1f} % of clips")
    moved = 100 * sum(d > 0.05 for d in loc_diffs) / len(loc_diffs)
    print(f"largest difference int8 - pytorch: probability {prob_diff:.4f}, next location {max(loc_diffs):.4f}")
    print(f"next location moved by more than 0.05 at {moved:.1f} % of the steps")


if __name__ == "__main__":
    main()
