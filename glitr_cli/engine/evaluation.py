"""`glitr eval`: accuracy at every step t for the learned glimpse policy and two baselines.

For one checkpoint: top-1/top-5 after each frame t with glimpses where T_l sends them
("learned"), fixed at the frame centre ("center") and at seeded uniform locations ("random"),
plus the full-frame teacher's (the checkpoint itself when it is a teacher, else the run's
teacher). Written as `eval.json` and plotted as `accuracy.png`:

    {"steps": T, "policies": {"learned": {"top1": [...T...], "top5": [...], "covered_area": f}, ...},
     "teacher": {"top1": [...], "top5": [...]}, "glimpse_area": f, ...}

`glimpse_area` is the fraction of the frame one glimpse covers; `covered_area` the mean
fraction of the frame that the union of a clip's T glimpses covered.

These are the numbers of ONE checkpoint. The paper reports another: for every t, the best top-1
over the per-epoch validations of the whole run. When the run's `metrics.jsonl` holds those
validations, `eval.json` also has `"best_over_epochs": {"top1": [...], "epoch": [...], "of":
"learned"|"teacher", "split": ..., "validations": n}`, a separate row of the table and a dotted line
of the plot.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table

from glitr_cli.data.dataset import build_dataset
from glitr_cli.engine.distributed import ShardSampler, all_reduce_sum, init_distributed
from glitr_cli.engine.loading import load_run_checkpoint, model_from_checkpoint
from glitr_cli.engine.metrics import METRICS_FILE, best_over_epochs, topk_correct
from glitr_cli.errors import GlitrError, warn
from glitr_cli.files import atomic_write, atomic_write_json
from glitr_cli.model import GliTr, OnlinePredictor, StudentOutput, glimpse_area_fraction, glimpse_mask
from glitr_cli.model.glitr import POLICIES
from glitr_cli.progress import track
from glitr_cli.recipe import COMMANDS, Recipe, resolve_recipe
from glitr_cli.runtime import Runtime, stop_workers

EVAL_FILE = "eval.json"
PLOT_FILE = "accuracy.png"


def covered_fraction(model: GliTr, locs: torch.Tensor, frame_size: tuple[int, int]) -> torch.Tensor:
    """Per clip, the fraction of the frame inside at least one of its glimpses: locs (B, T, 2) -> (B,)."""
    b, t = locs.shape[:2]
    side = model.backbone.glimpse_pixels
    mask = glimpse_mask(locs.flatten(0, 1).float(), frame_size, (side, side), model.backbone.glimpse_scale)
    return mask.view(b, t, *frame_size).amax(dim=1).mean(dim=(1, 2))  # (B,)


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
) -> dict[str, Any]:
    """Top-1/top-5 at every step t of `model` under each glimpse policy (and of `teacher` on full
    frames) over `loader` (every rank its shard), reduced over ranks."""
    device = runtime.device
    t = (teacher if teacher is not None else model).num_frames
    names = [*policies, *(["teacher"] if teacher is not None else [])]
    correct = torch.zeros(len(names), 2, t, dtype=torch.float64, device=device)
    covered = torch.zeros(len(policies), dtype=torch.float64, device=device)
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
            correct[i] += topk_correct(out.logits.float(), labels).double()
            covered[i] += covered_fraction(model, out.locs, frame_size).sum().double()
        if teacher is not None:
            with runtime.autocast():
                logits = teacher.forward_teacher(clips).logits
            correct[-1] += topk_correct(logits.float(), labels).double()
        total += labels.shape[0]
    for tensor in (correct, covered, total):
        all_reduce_sum(tensor)
    n = max(total.item(), 1.0)
    result: dict[str, Any] = {"steps": t, "clips": int(total.item()), "policies": {}}
    for i, name in enumerate(names):
        entry = {"top1": (correct[i, 0] / n).tolist(), "top5": (correct[i, 1] / n).tolist()}
        if name == "teacher":
            result["teacher"] = entry
        else:
            result["policies"][name] = {**entry, "covered_area": covered[i].item() / n}
    return result


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


def result_table(result: dict[str, Any]) -> Table:
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
    runtime = Runtime.from_recipe(r)
    runtime.apply()
    init_distributed(runtime)
    run_dir = Path(r.output_dir or ".")
    path = Path(checkpoint) if checkpoint is not None else run_dir / "checkpoints" / "last.pt"
    ckpt = load_run_checkpoint(path, produced_by=COMMANDS[r.kind])
    if ckpt["kind"] != r.kind:
        raise GlitrError(
            f"{path} is a {ckpt['kind']} checkpoint, but recipe {r.name} is a {r.kind} recipe; "
            "evaluate it with the recipe it was trained with"
        )
    model = model_from_checkpoint(ckpt, str(path)).to(runtime.device)
    if (model.num_frames, model.img_size) != (r.data.num_frames, r.data.img_size):
        raise GlitrError(
            f"{path} was trained on {model.num_frames} frames of {model.img_size} px, the recipe reads "
            f"{r.data.num_frames} of {r.data.img_size}; evaluate it with its own recipe"
        )
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
    try:
        policies, seed = list(r.eval.policies), r.eval.seed + runtime.rank
        # progress on stderr, beside the table on `console`; a caller that silences the table silences both
        shown = runtime.is_main and r.log.progress and console.file is sys.stdout
        batches = track(loader, "evaluating", len(loader), Console(stderr=True), r.log.progress_every, enabled=shown)
        result = evaluate_policies(model, batches, policies=policies, teacher=teacher, runtime=runtime, seed=seed)
    finally:
        stop_workers(loader)
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
        out = Path(out_dir) if out_dir is not None else run_dir
        atomic_write_json(out / EVAL_FILE, result)
        plot_accuracy(result, out / PLOT_FILE, title=f"{r.name} ({r.eval.split})")
        console.print(result_table(result))
        console.print(f"wrote {out / EVAL_FILE} and {out / PLOT_FILE}", highlight=False)
    return result
