"""What int8 costs in decisions: a GliTr student's float step against `glitr export --int8`'s, open loop.

    python scripts/int8_accuracy.py runs/demo/glitr/checkpoints/last.pt runs/demo/data --split val

Every clip of the prepared split goes through the evaluation transform and then, frame by frame, through
PyTorch's online predictor (the float step, closed loop: it chooses its own glimpses), and through the
exported float32 step and the int8 one in ONNX Runtime, both fed the glimpse locations PyTorch chose (open
loop: every step of all three sees the same pixels, so what differs is the arithmetic alone). Prints the
top-1 accuracy at every step t for each; for each ONNX step the share of clips whose top-1 at t agrees with
PyTorch's, at every t, and the mean and largest absolute difference of the class probabilities.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from glitr_cli.data.dataset import VideoFolderDataset
from glitr_cli.data.transforms import eval_transform
from glitr_cli.engine.loading import load_student
from glitr_cli.engine.onnx import OnnxPredictor, quantize_int8, step_program
from glitr_cli.model import OnlinePredictor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("data", type=Path, help="a prepared dataset folder (glitr prepare-data)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--threads", type=int, default=1, help="PyTorch's and ONNX Runtime's threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

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
    proto = step_program(student.model)
    exported = {
        "onnx": OnnxPredictor(proto.SerializeToString(), threads=args.threads),
        "onnx-int8": OnnxPredictor(quantize_int8(proto).SerializeToString(), threads=args.threads),
    }
    reference = OnlinePredictor(student.model)
    names = ["pytorch", *exported]
    correct = {name: torch.zeros(t) for name in names}
    agree = {name: torch.zeros(t) for name in exported}
    diff_sum = dict.fromkeys(exported, 0.0)
    diff_max = dict.fromkeys(exported, 0.0)
    for clip, label in dataset:
        reference.reset()
        for predictor in exported.values():
            predictor.reset()
        location = None  # a new stream's first glimpse: the learned first location
        for i, frame in enumerate(clip):
            ref = reference.step(frame[None])
            correct["pytorch"][i] += float(ref.probs.argmax() == label)
            for name, predictor in exported.items():
                out = predictor.step(frame[None], location=location)
                correct[name][i] += float(out.probs.argmax() == label)
                agree[name][i] += float(out.probs.argmax() == ref.probs.argmax())
                diff = (out.probs - ref.probs).abs()
                diff_sum[name] += float(diff.mean())
                diff_max[name] = max(diff_max[name], float(diff.max()))
            location = ref.next_location
    n = len(dataset)
    print(f"{n} clips of {args.data}:{args.split}, T={t}")
    for name in names:
        print(f"{name:10s} top-1 % at t=1..{t}: " + " ".join(f"{100 * c / n:.1f}" for c in correct[name].tolist()))
    for name in exported:
        steps = " ".join(f"{100 * a / n:.1f}" for a in agree[name].tolist())
        lowest = 100 * agree[name].min() / n
        print(f"{name:10s} top-1 agrees with pytorch, % of clips at t=1..{t}: {steps} (lowest {lowest:.1f})")
        print(
            f"{name:10s} |probability - pytorch's|: mean {diff_sum[name] / (n * t):.2e}, largest {diff_max[name]:.2e}"
        )


if __name__ == "__main__":
    main()
