"""Early decisions: ECE, the temperature fit, the decision rule and its curve, the online decider."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from glitr_cli.engine.decisions import (
    THRESHOLDS,
    Calibration,
    OnlineDecider,
    analyse,
    calibrate,
    calibration_error,
    choose_threshold,
    decision_steps,
    early_curve,
    fit_temperature,
)
from glitr_cli.errors import GlitrError


def test_decision_step_is_the_first_step_whose_top_probability_reaches_the_threshold():
    confidence = torch.tensor(
        [
            [0.20, 0.50, 0.90, 0.95],  # reaches 0.9 at the third step
            [0.10, 0.20, 0.30, 0.40],  # never: the last step decides
            [0.90, 0.10, 0.95, 0.20],  # at once, whatever comes after
            [0.50, 0.50, 0.50, 0.50],
        ]
    )
    assert decision_steps(confidence, 0.9).tolist() == [2, 3, 0, 3]
    assert decision_steps(confidence, 0.5).tolist() == [1, 3, 0, 0]  # reaching is enough
    assert decision_steps(confidence, 0.05).tolist() == [0, 0, 0, 0]
    assert decision_steps(confidence, 1.0).tolist() == [3, 3, 3, 3]


def test_early_curve_and_the_chosen_threshold_on_hand_built_probabilities():
    # 2 clips, 3 steps, 2 classes; clip 0 (label 0) is sure and right from step 2, clip 1 (label 1)
    # is sure and wrong at step 1, right at step 3
    probs = torch.tensor(
        [
            [[0.6, 0.4], [0.95, 0.05], [0.99, 0.01]],
            [[0.92, 0.08], [0.5, 0.5], [0.3, 0.7]],
        ]
    )
    labels = torch.tensor([0, 1])
    covered = torch.tensor([[0.3, 0.5, 0.6], [0.3, 0.4, 0.7]])
    curve = early_curve(probs, labels, covered, thresholds=(0.9, 0.93, 0.999))
    # 0.9: clip 0 at step 2 (right), clip 1 at step 1 (wrong)
    # 0.93: clip 0 at step 2, clip 1 never reaches it: step 3 (right)
    # 0.999: both at the last step
    assert curve["accuracy"] == [0.5, 1.0, 1.0]
    assert curve["mean_frames"] == [1.5, 2.5, 3.0]
    assert curve["decided_early"] == [1.0, 0.5, 0.0]
    assert curve["frame_seen"] == pytest.approx([(0.5 + 0.3) / 2, (0.5 + 0.7) / 2, (0.6 + 0.7) / 2])
    assert early_curve(probs, labels, None, thresholds=(0.9,))["frame_seen"] == [1.0]  # full frames
    assert choose_threshold(curve, last_accuracy=1.0) == 1  # the fewest frames at full accuracy
    assert choose_threshold(curve, last_accuracy=0.505) == 0  # 0.5 is within 1 point of 0.505
    assert choose_threshold({"accuracy": [0.5], "mean_frames": [1.0]}, last_accuracy=0.9) is None


def test_ece_on_hand_computed_cases():
    # bins of width 1/15: 0.9 lies in (13/15, 14/15], 0.7 in (10/15, 11/15]
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.7, 0.3], [0.3, 0.7]])
    labels = torch.tensor([0, 1, 0, 1])
    # bin of 0.9: accuracy 1/2, confidence 0.9; bin of 0.7: accuracy 1, confidence 0.7
    assert calibration_error(probs, labels) == pytest.approx(0.5 * 0.4 + 0.5 * 0.3)
    # one bin for all: |mean accuracy - mean confidence| only
    assert calibration_error(probs, labels, bins=1) == pytest.approx(abs(0.75 - 0.8))
    sure = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert calibration_error(sure, torch.tensor([0, 1])) == 0.0
    assert calibration_error(sure, torch.tensor([1, 0])) == 1.0


# the last: flat logits with a bias per class, as a weak student gives (an L-BFGS step on log T
# clamped to the range once stopped in the flat part beyond it, at the range's end)
@pytest.mark.parametrize("t0,scale,bias", [(0.5, 3.0, 0.0), (2.5, 3.0, 0.0), (0.1, 0.1, 0.1)])
def test_the_temperature_fit_recovers_the_temperature_that_calibrates(t0, scale, bias):
    # labels drawn from softmax(z / t0): dividing the logits by t0 calibrates them by construction
    g = torch.Generator().manual_seed(0)
    z = bias * torch.randn(6, generator=g) + scale * torch.randn(20000, 6, generator=g)  # (N, C)
    labels = torch.multinomial((z / t0).softmax(-1), 1, generator=g)[:, 0]
    fitted = fit_temperature(z, labels)
    assert fitted == pytest.approx(t0, rel=0.03)
    assert fit_temperature(z, labels) == fitted  # deterministic
    before = calibration_error(z.softmax(-1), labels)
    after = calibration_error(calibrate(z[:, None], [fitted])[:, 0], labels)
    assert after < 0.02 < 0.1 < before


def test_the_temperature_stays_in_range_on_separable_and_hopeless_logits():
    z = torch.tensor([[3.0, 0.0], [0.0, 3.0]])
    # always right: the NLL falls towards 0 with T; the fit stops once it is flat, far below 1
    assert 1e-3 <= fit_temperature(z, torch.tensor([0, 1])) < 0.2
    assert fit_temperature(z, torch.tensor([1, 0])) == pytest.approx(1e3, rel=1e-3)  # always wrong: the flattest


def test_analyse_calibrates_every_source_and_chooses_for_the_learned_policy():
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 4, (200,), generator=g)
    evidence = torch.nn.functional.one_hot(labels, 4).float()[:, None] * torch.tensor([0.5, 1.0, 2.0])[:, None]
    logits = evidence + torch.randn(200, 3, 4, generator=g)  # (N, T, C): surer with every step
    covered = torch.tensor([0.3, 0.5, 0.6]).expand(200, 3)
    calibration, early = analyse({"learned": (logits, covered), "teacher": (2 * logits, None)}, labels)
    assert len(calibration["temperature"]) == len(calibration["ece"]) == len(calibration["ece_calibrated"]) == 3
    assert all(a <= b + 1e-9 for a, b in zip(calibration["nll_calibrated"], calibration["nll"], strict=True))
    # the teacher's logits are twice the student's: its temperatures are twice, its curve the same
    teacher, learned = early["curves"]["teacher"], early["curves"]["learned"]
    assert teacher["temperature"] == pytest.approx([2 * t for t in learned["temperature"]], rel=1e-3)
    assert teacher["accuracy"] == learned["accuracy"] and teacher["frame_seen"] == [1.0] * len(THRESHOLDS)
    chosen = early["chosen"]
    i = THRESHOLDS.index(chosen["threshold"])
    assert (
        chosen["mean_frames"]
        == learned["mean_frames"][i]
        == min(
            f
            for f, a in zip(learned["mean_frames"], learned["accuracy"], strict=True)
            if a >= learned["last_step_accuracy"] - 0.01
        )
    )
    assert analyse({"center": (logits, covered)}, labels) == (None, None)


def test_online_decider_decides_once_per_window_and_again_when_a_sliding_class_changes():
    restart = OnlineDecider(0.8, num_frames=3, sliding=False)
    seen = [
        restart.update(1, 1, "a", 0.5),
        restart.update(2, 1, "a", 0.85),  # reaches 0.8
        restart.update(3, 1, "b", 0.9),  # decided already in this window
        restart.update(1, 2, "b", 0.3),  # a new window
        restart.update(2, 2, "b", 0.4),
        restart.update(3, 2, "c", 0.5),  # its last step decides without reaching
    ]
    assert [None if d is None else (d.name, d.step, d.window, d.reached) for d in seen] == [
        None,
        ("a", 2, 1, True),
        None,
        None,
        None,
        ("c", 3, 2, False),
    ]
    sliding = OnlineDecider(0.8, num_frames=2, sliding=True)
    seen = [
        sliding.update(1, 1, "a", 0.5),
        sliding.update(2, 1, "a", 0.6),  # the T-th step decides
        sliding.update(3, 1, "b", 0.7),  # another class, below the threshold
        sliding.update(4, 1, "b", 0.9),  # another class reaches it: decides again
        sliding.update(5, 1, "b", 0.95),  # the same class
    ]
    assert [None if d is None else (d.name, d.step) for d in seen] == [None, ("a", 2), None, ("b", 4), None]
    with pytest.raises(GlitrError, match=r"--decide must be a probability in \(0, 1\]"):
        OnlineDecider(1.5, num_frames=2, sliding=True)


def test_calibration_from_evaluation_results():
    source = Path("eval.json")
    result = {"calibration": {"temperature": [2.0, 0.5]}, "early": {"chosen": {"threshold": 0.9}}}
    calibration = Calibration.from_result(result, source, num_frames=2)
    assert calibration.threshold == 0.9
    logits = torch.tensor([1.0, 0.0])
    assert calibration.probs(logits, 1).tolist() == pytest.approx((logits / 2).softmax(-1).tolist())
    assert calibration.probs(logits, 5).tolist() == pytest.approx((logits / 0.5).softmax(-1).tolist())  # past T
    log_probs = logits.softmax(-1).log()  # what the ONNX step gives: the same calibrated probabilities
    assert calibration.probs(log_probs, 1).tolist() == pytest.approx(calibration.probs(logits, 1).tolist())
    assert Calibration.from_result({**result, "early": {"chosen": None}}, source, 2).threshold is None
    with pytest.raises(GlitrError, match="eval.json holds no calibration"):
        Calibration.from_result({"steps": 2}, source, 2)
    with pytest.raises(GlitrError, match="evaluated with T=2 steps, the checkpoint has T=4"):
        Calibration.from_result(result, source, 4)
