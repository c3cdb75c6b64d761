"""Early decisions: when has GliTr seen enough of a clip to name its action? Per-step calibration (ECE,
one fitted temperature per step), the rule (decide at the first step whose top probability reaches
tau, else at the last), its curve over a grid of thresholds and the chosen threshold, as tensor
functions that `glitr eval`, `predict`, `stream` and `visualize` share. What each means:
docs/online.md#early-decisions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from rich.table import Table

from glitr_cli.errors import GlitrError
from glitr_cli.files import atomic_write

ECE_BINS = 15
# the thresholds `glitr eval` sweeps: coarse over the middle, fine near 1, where the decisions of a
# model that calibration made sharper move
THRESHOLDS = (
    *(round(0.05 * i, 2) for i in range(2, 19)),
    *(0.92, 0.94, 0.96, 0.97, 0.98, 0.99, 0.995, 0.998, 0.999, 0.9995, 0.9999),
)
TOLERANCE = 0.01  # the chosen threshold's accuracy is at most this far below the last step's
TEMPERATURE_RANGE = (1e-3, 1e3)  # a fitted temperature lies inside (separable clips drive it towards 0)
EARLY_PLOT_FILE = "early.png"
CURVE_KEYS = ("accuracy", "mean_frames", "decided_early", "frame_seen")


# ------------------------------------------------------------------------------------------ calibration


def calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Expected calibration error of probabilities (N, C) against labels (N,): the top probability
    in `bins` equal-width bins (0, 1/bins], ..., ((bins-1)/bins, 1]; the sum over bins of
    |accuracy - mean top probability| weighted by the bin's share of the N."""
    confidence, predicted = probs.double().max(dim=-1)  # (N,), (N,)
    correct = (predicted == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)[1:-1]  # the bins - 1 inner edges
    bin_of = torch.bucketize(confidence, edges)  # (N,) in 0..bins-1; an edge belongs to the bin below
    gap = torch.zeros(bins, dtype=torch.float64).index_add_(0, bin_of, correct - confidence)  # (bins,)
    return float(gap.abs().sum() / max(len(labels), 1))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature T > 0 that minimises the mean negative log-likelihood of softmax(logits / T)
    for logits (N, C) and labels (N,), within `TEMPERATURE_RANGE`: L-BFGS in float64 on the CPU
    (deterministic) over u, log T = lo + (hi - lo) * sigmoid(u), a smooth map onto the range that
    starts at T = 1. The NLL is convex in 1/T, so the minimum is the only one; on clips that are all
    right by a margin it lies at T -> 0, and the fit stops where the NLL is flat."""
    z, y = logits.detach().double().cpu(), labels.cpu()
    lo, hi = (math.log(v) for v in TEMPERATURE_RANGE)
    u = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [u], lr=1.0, max_iter=200, tolerance_grad=1e-10, tolerance_change=1e-14, line_search_fn="strong_wolfe"
    )

    def temperature() -> torch.Tensor:
        return (lo + (hi - lo) * torch.sigmoid(u)).exp()

    def nll() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(z / temperature(), y)
        loss.backward()
        return loss

    optimizer.step(nll)
    return float(temperature().detach())


def calibrate(logits: torch.Tensor, temperatures: Sequence[float]) -> torch.Tensor:
    """Calibrated probabilities: logits (N, T, C) over the temperature of their step -> (N, T, C)."""
    t = torch.as_tensor(temperatures, dtype=logits.dtype, device=logits.device)
    return (logits / t[:, None]).softmax(dim=-1)


def calibration_per_step(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """For logits (N, T, C): a temperature per step fitted on these clips, and per step the ECE and
    the NLL before (temperature 1) and after."""
    steps = range(logits.shape[1])
    temperatures = [fit_temperature(logits[:, t], labels) for t in steps]
    before, after = logits.softmax(dim=-1), calibrate(logits, temperatures)
    return {
        "bins": ECE_BINS,
        "temperature": temperatures,
        "ece": [calibration_error(before[:, t], labels) for t in steps],
        "ece_calibrated": [calibration_error(after[:, t], labels) for t in steps],
        "nll": [float(F.cross_entropy(logits[:, t].double(), labels)) for t in steps],
        "nll_calibrated": [float(F.cross_entropy(logits[:, t].double() / temperatures[t], labels)) for t in steps],
    }


# --------------------------------------------------------------------------------------------- the rule


def decision_steps(confidence: torch.Tensor, threshold: float) -> torch.Tensor:
    """The step (0-based) at which each clip is decided: the first whose top probability reaches
    `threshold`, else the last. confidence (N, T) -> (N,) int64."""
    reached = confidence >= threshold  # (N, T)
    reached[:, -1] = True
    return reached.int().argmax(dim=1)  # the first maximum: the first step that reached it


def early_curve(
    probs: torch.Tensor,
    labels: torch.Tensor,
    covered: torch.Tensor | None = None,
    thresholds: Sequence[float] = THRESHOLDS,
) -> dict[str, list[float]]:
    """The decision rule over a grid of thresholds, for probabilities (N, T, C) and labels (N,).

    Per threshold: `accuracy` of the decided classes, `mean_frames` until the decision (1..T),
    `decided_early` (share decided before the last step) and `frame_seen` (mean share of the frame
    inside the glimpses read until the decision; `covered` (N, T) is that share up to each step, None
    for full frames)."""
    confidence, predicted = probs.max(dim=-1)  # (N, T), (N, T)
    n, t = confidence.shape
    curve: dict[str, list[float]] = {k: [] for k in CURVE_KEYS}
    rows = torch.arange(n)
    for threshold in thresholds:
        step = decision_steps(confidence, threshold)  # (N,)
        curve["accuracy"].append(float((predicted[rows, step] == labels).double().mean()))
        curve["mean_frames"].append(float((step + 1).double().mean()))
        curve["decided_early"].append(float((step < t - 1).double().mean()))
        curve["frame_seen"].append(1.0 if covered is None else float(covered[rows, step].double().mean()))
    return curve


def choose_threshold(curve: Mapping[str, Sequence[float]], last_accuracy: float) -> int | None:
    """Index of the threshold with the fewest mean frames whose accuracy is within `TOLERANCE` of
    `last_accuracy` (ties: the more accurate, then the lower threshold); None when none is."""
    ok = [i for i, a in enumerate(curve["accuracy"]) if a >= last_accuracy - TOLERANCE - 1e-12]
    return min(ok, key=lambda i: (curve["mean_frames"][i], -curve["accuracy"][i], i), default=None)


def analyse(
    clips: Mapping[str, tuple[torch.Tensor, torch.Tensor | None]], labels: torch.Tensor, of: str = "learned"
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """`glitr eval`'s "calibration" (of the `of` policy) and "early" entries from every source's logits
    (N, T, C) and covered share of the frame (N, T) (None: full frames), each source calibrated with
    its own temperatures. (None, None) without the `of` policy."""
    if of not in clips or len(labels) == 0:
        return None, None
    early: dict[str, Any] = {"thresholds": list(THRESHOLDS), "tolerance": TOLERANCE, "of": of, "curves": {}}
    calibration: dict[str, Any] = {}
    for name, (logits, covered) in clips.items():
        fitted = calibration_per_step(logits, labels)
        if name == of:
            calibration = {"of": of, **fitted}
        curve = early_curve(calibrate(logits, fitted["temperature"]), labels, covered)
        last = float((logits[:, -1].argmax(-1) == labels).double().mean())
        early["curves"][name] = {**curve, "last_step_accuracy": last, "temperature": fitted["temperature"]}
    chosen_curve = early["curves"][of]
    i = choose_threshold(chosen_curve, chosen_curve["last_step_accuracy"])
    early["chosen"] = None if i is None else {"threshold": THRESHOLDS[i], **{k: chosen_curve[k][i] for k in CURVE_KEYS}}
    return calibration, early


# ---------------------------------------------------------------------------------------- eval's output


def _steps_shown(t: int) -> list[int]:
    return sorted({1, (t + 1) // 2, t})


def calibration_table(calibration: Mapping[str, Any]) -> Table:
    """ECE before and after calibration, and the temperature, at the first, middle and last step."""
    cols = _steps_shown(len(calibration["temperature"]))
    table = Table(title=f"calibration of the {calibration['of']} policy (ECE, {calibration['bins']} bins)")
    table.add_column("")
    for c in cols:
        table.add_column(f"t={c}", justify="right")
    rows = [
        ("ECE before (%)", [f"{100 * calibration['ece'][c - 1]:.2f}" for c in cols]),
        ("ECE calibrated (%)", [f"{100 * calibration['ece_calibrated'][c - 1]:.2f}" for c in cols]),
        ("temperature", [f"{calibration['temperature'][c - 1]:.3f}" for c in cols]),
    ]
    for name, cells in rows:
        table.add_row(name, *cells)
    return table


def early_table(early: Mapping[str, Any], steps: int) -> Table:
    """Each source at the chosen threshold (or, when none keeps the accuracy, at the last step)."""
    chosen = early["chosen"]
    i = early["thresholds"].index(chosen["threshold"]) if chosen else len(early["thresholds"]) - 1
    title = (
        f"early decisions at tau = {chosen['threshold']:g} (the fewest frames within "
        f"{100 * early['tolerance']:g} point of the last step's accuracy)"
        if chosen
        else f"no threshold keeps the accuracy within {100 * early['tolerance']:g} point of the last step's"
    )
    table = Table(title=title)
    table.add_column("policy")
    for column in ("top-1", "top-1 at t=T", "frames", "decided early", "frame seen"):
        table.add_column(column, justify="right")
    for name, c in early["curves"].items():
        table.add_row(
            name,
            f"{100 * c['accuracy'][i]:.2f}",
            f"{100 * c['last_step_accuracy']:.2f}",
            f"{c['mean_frames'][i]:.2f} of {steps}",
            f"{100 * c['decided_early'][i]:.0f}%",
            f"{100 * c['frame_seen'][i]:.1f}%",
        )
    return table


def plot_early(early: Mapping[str, Any], top1: Mapping[str, Sequence[float]], path: Path, title: str = "") -> None:
    """Accuracy of the decisions against the mean frames seen until them, one curve per source over
    the thresholds (the chosen one marked), and dotted the `of` policy deciding at a fixed step t
    (`top1`: its top-1 after each t)."""
    fig = Figure(figsize=(8, 4), dpi=120)  # no pyplot: no GUI backend, no global figure state
    ax = fig.subplots()
    for name, c in early["curves"].items():
        order = sorted(range(len(c["mean_frames"])), key=lambda i: c["mean_frames"][i])
        style = "k.--" if name == "teacher" else ".-"
        label = "teacher (full frames)" if name == "teacher" else f"{name} glimpses"
        ax.plot([c["mean_frames"][i] for i in order], [100 * c["accuracy"][i] for i in order], style, label=label)
    of = early["of"]
    steps = list(range(1, len(top1[of]) + 1))
    ax.plot(steps, [100 * a for a in top1[of]], ":", color="grey", label=f"{of}, deciding at a fixed step t")
    if early["chosen"] is not None:
        chosen = early["chosen"]
        ax.plot(
            chosen["mean_frames"],
            100 * chosen["accuracy"],
            "r*",
            markersize=12,
            label=f"chosen tau = {chosen['threshold']:g}",
        )
    ax.set_xlabel("mean frames seen until the decision")
    ax.set_ylabel("top-1 of the decisions (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the axes, off the lines
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))


# ------------------------------------------------------------------------------------------ online use


@dataclass(frozen=True)
class Calibration:
    """What online use takes from `glitr eval`'s results: a temperature per step and the chosen
    threshold (None when no threshold kept the accuracy)."""

    temperatures: tuple[float, ...]
    threshold: float | None
    source: Path

    @classmethod
    def from_result(cls, result: Mapping[str, Any], source: Path, num_frames: int) -> Calibration:
        """From an eval.json record; one without calibration, or for another T, is a GlitrError."""
        calibration, early = result.get("calibration"), result.get("early")
        if not isinstance(calibration, Mapping) or "temperature" not in calibration:
            raise GlitrError(f"{source} holds no calibration; rerun `glitr eval` on the student to write one")
        temperatures = tuple(float(v) for v in calibration["temperature"])
        if len(temperatures) != num_frames:
            raise GlitrError(
                f"{source} was evaluated with T={len(temperatures)} steps, the checkpoint has T={num_frames}; "
                "evaluate this checkpoint"
            )
        chosen = early.get("chosen") if isinstance(early, Mapping) else None
        return cls(temperatures, None if chosen is None else float(chosen["threshold"]), source)

    def probs(self, logits: torch.Tensor, step: int) -> torch.Tensor:
        """Calibrated probabilities of logits (..., C) at `step` (1-based; past T: the T-th's).
        Log-probabilities work as logits: softmax is blind to a shift."""
        return (logits / self.temperatures[min(step, len(self.temperatures)) - 1]).softmax(dim=-1)


def check_threshold(threshold: float | None) -> None:
    if threshold is not None and not 0 < threshold <= 1:
        raise GlitrError(f"--decide must be a probability in (0, 1], got {threshold}")


@dataclass(frozen=True)
class Decision:
    """A decision taken online: the class, its (calibrated) probability, and when."""

    name: str
    p: float
    step: int  # 1-based position in its window; past T in a sliding context
    window: int
    reached: bool  # p reached the threshold (False: the T-th step decided without it)


class OnlineDecider:
    """The decision rule over steps that arrive one at a time.

    In a window (a clip, or a restart context's T steps) the first step whose top probability reaches
    the threshold decides, else the T-th. A sliding context goes on after that: every later step
    whose top class reaches the threshold and differs from the decided one decides again. A restart
    context decides once per window."""

    def __init__(self, threshold: float, num_frames: int, sliding: bool) -> None:
        check_threshold(threshold)
        self.threshold = threshold
        self.num_frames = num_frames
        self.sliding = sliding
        self.window = 0
        self.decided: Decision | None = None

    def update(self, step: int, window: int, name: str, p: float) -> Decision | None:
        """The decision taken at this step (`step` 1-based, `name` and `p` its top class), or None."""
        if window != self.window:
            self.window, self.decided = window, None
        reached = p >= self.threshold
        if self.decided is None:
            fires = reached or step >= self.num_frames
        else:
            fires = self.sliding and reached and name != self.decided.name
        if not fires:
            return None
        self.decided = Decision(name, p, step, window, reached)
        return self.decided
