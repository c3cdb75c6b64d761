"""`glitr eval`: accuracy at every step t for the learned glimpse policy and two baselines.

For one checkpoint: top-1/top-5 after each frame t with glimpses where T_l sends them ("learned"),
at the frame centre ("center") and at seeded uniform locations ("random"), plus the full-frame
teacher's, with the glimpses' `locations` and `covered_area`; the calibration and early-decision
curves of `engine/decisions.py`; and, from the run's `metrics.jsonl`, the paper's figure
`best_over_epochs` (docs/training.md#which-number-to-read). Written as `eval.json`, `accuracy.png`
and `early.png`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from rich.console import Console, Group
from rich.table import Table

from glitr_cli.data.dataset import build_dataset
from glitr_cli.engine.checkpoint import LAST
from glitr_cli.engine.decisions import (
    EARLY_PLOT_FILE,
    Calibration,
    analyse,
    calibration_table,
    check_threshold,
    early_table,
    plot_early,
)
from glitr_cli.engine.distributed import ShardSampler, all_gather_objects, all_reduce_sum, init_distributed
from glitr_cli.engine.loading import checkpoint_recipe, geometry_mismatch, load_run_checkpoint, model_from_checkpoint
from glitr_cli.engine.metrics import METRICS_FILE, best_over_epochs, topk_correct
from glitr_cli.errors import GlitrError, warn
from glitr_cli.files import atomic_write, atomic_write_json
from glitr_cli.model import GliTr, OnlinePredictor, StudentOutput, glimpse_area_fraction, glimpse_mask
from glitr_cli.model.glitr import POLICIES
from glitr_cli.paths import RECIPE_FILE, run_of
from glitr_cli.progress import track
from glitr_cli.recipe import COMMANDS, Recipe, resolve_recipe
from glitr_cli.runtime import Runtime, stop_workers

EVAL_FILE = "eval.json"
PLOT_FILE = "accuracy.png"


def covered_by_step(model: GliTr, locs: torch.Tensor, frame_size: tuple[int, int]) -> torch.Tensor:
    """Per clip and step t, the fraction of the frame inside at least one of its glimpses 1..t:
    locs (B, T, 2) -> (B, T)."""
    b, t = locs.shape[:2]
    side = model.backbone.glimpse_pixels
    mask = glimpse_mask(locs.flatten(0, 1).float(), frame_size, (side, side), model.backbone.glimpse_scale)
    return mask.view(b, t, *frame_size).cummax(dim=1).values.mean(dim=(2, 3))  # (B, T)


class ClipOutputs:
    """What `evaluate_policies` keeps per clip for the early decisions, on the CPU: each source's
    logits (B, T, C) and share of the frame covered up to each step (B, T) (None: full frames)."""

    def __init__(self) -> None:
        self.sources: dict[str, list[tuple[torch.Tensor, torch.Tensor | None]]] = {}
        self.labels: list[torch.Tensor] = []

    def add(self, name: str, logits: torch.Tensor, covered: torch.Tensor | None = None) -> None:
        self.sources.setdefault(name, []).append((logits.cpu(), None if covered is None else covered.cpu()))

    def gather(self) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor | None]], torch.Tensor]:
        """Every rank's clips: {source: (logits (N, T, C), covered (N, T) or None)}, labels (N,)."""
        ranks = all_gather_objects((self.sources, self.labels))
        labels = torch.cat([y for _, labels in ranks for y in labels])
        out = {}
        for name in self.sources:
            batches = [batch for sources, _ in ranks for batch in sources[name]]
            covered = None if batches[0][1] is None else torch.cat([c for _, c in batches])
            out[name] = (torch.cat([z for z, _ in batches]), covered)
        return out, labels


@torch.no_grad()
def predict_clips(
    model: GliTr,
    clips: torch.Tensor,
    runtime: Runtime,
    policy: str = "learned",
    generator: torch.Generator | None = None,
) -> StudentOutput:
    """The student's glimpse pass over whole clips (B, T, 3, S, S) on the runtime's device and precision."""
    with runtime.autocast():
        return model.forward_student(clips.to(runtime.device), policy, generator=generator)


def online_predictor(
    model: GliTr, runtime: Runtime, batch_size: int = 1, context: str | None = None
) -> OnlinePredictor:
    """The frame-by-frame predictor with the runtime's precision and CUDA graphs (what `visualize` runs);
    `context` is the predictor's (what follows the T-th step)."""
    return OnlinePredictor(
        model, batch_size, amp_dtype=runtime.amp_dtype, cuda_graphs=runtime.eval_graphs, context=context
    )


@torch.no_grad()
def evaluate_policies(
    model: GliTr,
    loader: Any,
    *,
    policies: list[str],
    teacher: GliTr | None,
    runtime: Runtime,
    seed: int,
    outputs: ClipOutputs | None = None,
    observe_locs: Callable[[str, torch.Tensor], None] | None = None,
) -> dict[str, Any]:
    """Top-1/top-5 at every step t of `model` under each glimpse policy (and of `teacher` on full
    frames) over `loader` (every rank its shard), reduced over ranks, with where the glimpses went
    (`locations`: per step, the mean and spread of x and y; the teacher's are T_l's on full frames);
    `outputs` also keeps each clip's logits and covered frame, and `observe_locs(name, locs)` sees
    each batch's locations (B, T, 2) in the loader's order."""
    device = runtime.device
    t = (teacher if teacher is not None else model).num_frames
    names = [*policies, *(["teacher"] if teacher is not None else [])]
    correct = torch.zeros(len(names), 2, t, dtype=torch.float64, device=device)
    covered = torch.zeros(len(policies), dtype=torch.float64, device=device)
    moments = torch.zeros(len(names), 2, t, 2, dtype=torch.float64, device=device)  # sums of locs and locs^2
    total = torch.zeros((), dtype=torch.float64, device=device)
    generator = torch.Generator().manual_seed(seed)  # the random policy draws on the CPU
    for m in (model, teacher):
        if m is not None:
            m.eval()
    for clips, labels in loader:
        if bool((labels < 0).any()):
            raise GlitrError("the evaluated split has no labels (e.g. SSv2's test split); use eval.split=val")
        clips, labels = clips.to(device), labels.to(device)
        frame_size = tuple(clips.shape[-2:])
        for i, policy in enumerate(policies):
            out = predict_clips(model, clips, runtime, policy, generator)
            covered_t = covered_by_step(model, out.locs, frame_size)  # (B, T)
            correct[i] += topk_correct(out.logits.float(), labels).double()
            covered[i] += covered_t[:, -1].sum().double()
            moments[i] += _moments(out.locs)
            if observe_locs is not None:
                observe_locs(policy, out.locs)
            if outputs is not None:
                outputs.add(policy, out.logits.float(), covered_t)
        if teacher is not None:
            with runtime.autocast():
                logits, locs = teacher.forward_teacher(clips)[1:]
            correct[-1] += topk_correct(logits.float(), labels).double()
            moments[-1] += _moments(locs)
            if observe_locs is not None:
                observe_locs("teacher", locs)
            if outputs is not None:
                outputs.add("teacher", logits.float())
        if outputs is not None:
            outputs.labels.append(labels.cpu())
        total += labels.shape[0]
    for tensor in (correct, covered, moments, total):
        all_reduce_sum(tensor)
    n = max(total.item(), 1.0)
    result: dict[str, Any] = {"steps": t, "clips": int(total.item()), "policies": {}}
    for i, name in enumerate(names):
        mean, square = moments[i] / n
        std = (square - mean**2).clamp(min=0).sqrt()
        entry = {
            "top1": (correct[i, 0] / n).tolist(),
            "top5": (correct[i, 1] / n).tolist(),
            "locations": {
                "x_mean": mean[:, 0].tolist(),
                "x_std": std[:, 0].tolist(),
                "y_mean": mean[:, 1].tolist(),
                "y_std": std[:, 1].tolist(),
            },
        }
        if name == "teacher":
            result["teacher"] = entry
        else:
            result["policies"][name] = {**entry, "covered_area": covered[i].item() / n}
    return result


def _moments(locs: torch.Tensor) -> torch.Tensor:
    """Sums over clips of the locations and their squares: (B, T, 2) -> (2, T, 2)."""
    locs = locs.double()
    return torch.stack([locs.sum(0), (locs * locs).sum(0)])


def plot_accuracy(result: dict[str, Any], path: Path, title: str = "") -> None:
    """Top-1 accuracy against the number of frames seen, one line per policy (teacher dashed)."""
    steps = list(range(1, result["steps"] + 1))
    fig = Figure(figsize=(6, 4), dpi=120)  # no pyplot: no GUI backend, no global figure state
    ax = fig.subplots()
    for name, entry in result["policies"].items():
        ax.plot(steps, [100 * a for a in entry["top1"]], marker="o", markersize=3, label=f"{name} glimpses")
    if "teacher" in result:
        ax.plot(steps, [100 * a for a in result["teacher"]["top1"]], "k--", label="teacher (full frames)")
    if "best_over_epochs" in result:
        best = result["best_over_epochs"]
        ax.plot(steps, [100 * a for a in best["top1"]], ":", label=f"{best['of']}, best over epochs")
    ax.set_xlabel("frames seen (t)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))


def result_table(result: dict[str, Any]) -> Group:
    """The accuracy table, and when there, the calibration and early-decision tables."""
    tables = [accuracy_table(result)]
    if result.get("calibration"):
        tables.append(calibration_table(result["calibration"]))
    if result.get("early"):
        tables.append(early_table(result["early"], result["steps"]))
    return Group(*tables)


def accuracy_table(result: dict[str, Any]) -> Table:
    t = result["steps"]
    cols = sorted({1, (t + 1) // 2, t})
    table = Table(title=f"accuracy after t frames ({result['clips']} clips)")
    table.add_column("policy")
    for c in cols:
        table.add_column(f"top-1 t={c}", justify="right")
    table.add_column(f"top-5 t={t}", justify="right")
    table.add_column("frame seen", justify="right")
    rows = [(name, e, f"{100 * e['covered_area']:.1f}%") for name, e in result["policies"].items()]
    if "teacher" in result:
        rows.append(("teacher (full)", result["teacher"], "100%"))
    if "best_over_epochs" in result:
        best = result["best_over_epochs"]
        rows.append((f"{best['of']}, best over {best['validations']} epochs", {**best, "top5": None}, ""))
    for name, e, seen in rows:
        top5 = f"{100 * e['top5'][-1]:.2f}" if e["top5"] else "-"
        table.add_row(name, *[f"{100 * e['top1'][c - 1]:.2f}" for c in cols], top5, seen)
    return table


def own_recipe_command(checkpoint: Path) -> str:
    """The `glitr eval` command that evaluates `checkpoint` with the recipe its run saved (RUN/recipe.yaml,
    whose output folder is the run's own: its last.pt needs no --checkpoint)."""
    saved = run_of(checkpoint) / RECIPE_FILE
    if not saved.is_file():
        return f"glitr eval RECIPE --checkpoint {checkpoint}"
    return f"glitr eval {saved}" + ("" if checkpoint.name == LAST else f" --checkpoint {checkpoint}")


def run_eval(
    recipe: Recipe,
    *,
    checkpoint: str | Path | None = None,
    out_dir: str | Path | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Evaluate a run's checkpoint (default: its last.pt) on `eval.split`; write eval.json and accuracy.png."""
    console = console or Console()
    r = resolve_recipe(recipe)
    runtime = Runtime.for_this_machine(r)
    runtime.apply()
    init_distributed(runtime)
    run_dir = Path(r.output_dir or ".")
    path = Path(checkpoint) if checkpoint is not None else run_dir / "checkpoints" / "last.pt"
    ckpt = load_run_checkpoint(path, produced_by=COMMANDS[r.kind])
    if ckpt["kind"] != r.kind:
        raise GlitrError(
            f"{path} is a {ckpt['kind']} checkpoint, but recipe {r.name} is a {r.kind} recipe; "
            f"evaluate it with the recipe it was trained with: {own_recipe_command(path)}"
        )
    mismatch = geometry_mismatch(checkpoint_recipe(ckpt, str(path)), r, weights=False)
    if mismatch is not None:
        what, fix = mismatch
        raise GlitrError(
            f"{path} was {what}; evaluate it with its own recipe: {own_recipe_command(path)} (or set {fix})"
        )
    model = model_from_checkpoint(ckpt, str(path)).to(runtime.device)
    unknown = [p for p in r.eval.policies if p not in POLICIES]
    if unknown:
        raise GlitrError(f"eval.policies: unknown policy {unknown[0]!r}; choose from {', '.join(POLICIES)}")

    dataset = build_dataset(r.data, r.eval.split, train=False)
    if list(dataset.class_names) != list(ckpt["class_names"]):
        raise GlitrError(f"{path} was trained on other classes than {r.data.root} holds")
    teacher: GliTr | None = None
    if ckpt["kind"] == "teacher":
        teacher = model
    elif r.eval.teacher and r.objective.teacher is not None:
        if Path(r.objective.teacher).is_file():
            teacher_ckpt = load_run_checkpoint(r.objective.teacher, produced_by="train-teacher")
            teacher = model_from_checkpoint(teacher_ckpt, r.objective.teacher).to(runtime.device)
        elif runtime.is_main:
            warn(console, f"teacher {r.objective.teacher} not found; its full-frame accuracy is left out")

    sampler = ShardSampler(len(dataset), rank=runtime.rank, world_size=runtime.world_size)
    loader = runtime.loader(dataset, batch_size=r.eval.batch_size, sampler=sampler)
    outputs = ClipOutputs()
    try:
        policies, seed = list(r.eval.policies), r.eval.seed + runtime.rank
        # progress on stderr, beside the table on `console`; a caller that silences the table silences both
        shown = runtime.is_main and r.log.progress and console.file is sys.stdout
        batches = track(loader, "evaluating", len(loader), Console(stderr=True), r.log.progress_every, enabled=shown)
        result = evaluate_policies(
            model, batches, policies=policies, teacher=teacher, runtime=runtime, seed=seed, outputs=outputs
        )
    finally:
        stop_workers(loader)
    clips, labels = outputs.gather()
    result = {
        "steps": result["steps"],
        "policies": result["policies"],
        **({"teacher": result["teacher"]} if "teacher" in result else {}),
        "glimpse_area": glimpse_area_fraction(model.img_size, model.patch_size, model.glimpse_size),
        "clips": result["clips"],
        "split": r.eval.split,
        "checkpoint": str(path),
        "kind": ckpt["kind"],
        "epoch": ckpt["progress"]["epoch"],
        "step": ckpt["progress"]["step"],
    }
    best = best_over_epochs(run_dir / METRICS_FILE)
    if best is not None and len(best["top1"]) == result["steps"]:
        of = "teacher" if ckpt["kind"] == "teacher" else "learned"
        result["best_over_epochs"] = {"of": of, "split": r.data.val_split, **best}
    if runtime.is_main:
        calibration, early = analyse(clips, labels)
        if calibration is not None:
            result["calibration"], result["early"] = calibration, early
        out = Path(out_dir) if out_dir is not None else run_dir
        atomic_write_json(out / EVAL_FILE, result)
        plots = [out / PLOT_FILE]
        plot_accuracy(result, plots[0], title=f"{r.name} ({r.eval.split})")
        if early is not None:
            top1 = {name: e["top1"] for name, e in result["policies"].items()}
            plots.append(out / EARLY_PLOT_FILE)
            plot_early(early, top1, plots[1], title=f"{r.name} ({r.eval.split}): early decisions")
        console.print(result_table(result))
        console.print(f"wrote {out / EVAL_FILE}, {', '.join(str(p) for p in plots)}", highlight=False)
    return result


def decision_settings(
    checkpoint: str | Path,
    num_frames: int,
    *,
    calibrated: bool = False,
    calibration: str | Path | None = None,
    decide: float | None = None,
    console: Console | None = None,
) -> tuple[Calibration | None, float | None]:
    """What `--calibrated`, `--calibration PATH` and `--decide TAU` ask of `predict`, `stream` and
    `visualize`: the calibration (None: the model's own probabilities) and the decision threshold
    (None: no decisions). Without `decide` the threshold is the one `glitr eval` chose, when its
    results are used."""
    check_threshold(decide)
    found = None
    if calibrated or calibration is not None:
        found = read_calibration(checkpoint, num_frames, calibration, console)
    return found, decide if decide is not None else (found.threshold if found is not None else None)


def read_calibration(
    checkpoint: str | Path, num_frames: int, path: str | Path | None = None, console: Console | None = None
) -> Calibration:
    """The temperatures and chosen threshold `glitr eval` wrote for a student checkpoint: from `path`
    (an eval.json), else from the checkpoint's run: RUN/eval.json (where `glitr eval` writes by
    default; RUN holds checkpoints/), else the one in the folder above RUN (where `glitr demo` writes
    it). Results of another checkpoint are refused; results older than the checkpoint are used with a
    warning (the checkpoint may have been trained further since)."""
    checkpoint = Path(checkpoint)
    if path is None:
        run = checkpoint.parent.parent
        found = [p for p in (run / EVAL_FILE, run.parent / EVAL_FILE) if p.is_file()]
        if not found:
            raise GlitrError(
                f"--calibrated: no {EVAL_FILE} in {run} or {run.parent}; evaluate the run first "
                "(`glitr eval RECIPE`) or name the evaluation results with --calibration PATH"
            )
        path = found[0]
    path = Path(path)
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise GlitrError(f"--calibration {path}: not readable as evaluation results ({e})") from None
    if not isinstance(result, dict) or result.get("kind") != "glitr":
        raise GlitrError(f"--calibration {path}: not the evaluation results of a GliTr student (`glitr eval`)")
    evaluated = Path(str(result.get("checkpoint", "")))
    if evaluated.is_file() and checkpoint.is_file() and not evaluated.samefile(checkpoint):
        raise GlitrError(
            f"{path} evaluates {evaluated}, not {checkpoint}; evaluate this checkpoint "
            "(`glitr eval RECIPE --checkpoint CKPT`) and pass its eval.json with --calibration"
        )
    if checkpoint.is_file() and checkpoint.stat().st_mtime > path.stat().st_mtime:
        warn(console, f"{path} is older than {checkpoint}; rerun `glitr eval` if it was trained further")
    return Calibration.from_result(result, path, num_frames)
