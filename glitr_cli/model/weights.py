"""Loading and converting weights: our checkpoints, the original GliTr layout, iBOT, timm. Files are read
with `weights_only=True`; one that does not fit the model is one `GlitrError` listing the missing,
unexpected and misshaped keys. timm's weights come from the Hub's local cache when the Hub is out of
reach, and weights that are not there are a `WeightsUnavailable` at once.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import socket
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

import timm
import torch
import torch.nn as nn
from huggingface_hub import constants as hub
from timm.layers import resample_abs_pos_embed

from glitr_cli.errors import GlitrError
from glitr_cli.model.glitr import GliTr

StateDict = dict[str, torch.Tensor]

# module and parameter names of the original GliTr release -> ours
_ORIGINAL_PREFIXES = (
    ("temporal_head.patch_embed.embed_layer.", "classifier.input_proj."),
    ("temploc_head.patch_embed.embed_layer.", "locator.input_proj."),
    ("temporal_head.tmp_embed", "classifier.temporal_embed"),
    ("temploc_head.tmp_embed", "locator.temporal_embed"),
    ("temporal_head.", "classifier."),
    ("temploc_head.", "locator."),
)


HUB_CHECK_TIMEOUT_S = 3.0  # a hub (or proxy) that does not accept a connection this quickly counts as unreachable


class WeightsUnavailable(GlitrError):
    """timm weights that cannot be had here: not in the local cache, and the hub cannot be reached."""


# released checkpoints (VideoMAE's plain training path) store their `args` as a Namespace: plain data
_SAFE_GLOBALS = [argparse.Namespace]


def read_checkpoint(path: str | Path) -> object:
    """`torch.load` with `weights_only=True`; a missing or unreadable file is one clear line."""
    path = Path(path)
    if not path.is_file():
        raise GlitrError(f"{path}: no such checkpoint file")
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle with foreign objects, garbage bytes
        raise GlitrError(f"{path}: not a readable PyTorch checkpoint ({_first_line(e)})") from None


def _first_line(e: Exception) -> str:
    """The gist of torch.load's (often multi-paragraph, ANSI-coloured) error message."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).split("WeightsUnpickler error:")[-1]
    boilerplate = ("Weights only load failed", "Check the documentation")  # torch's advice around the reason
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith(boilerplate)]
    reason = lines[0].split(". Please use")[0][:160] if lines else ""
    return f"{type(e).__name__}: {reason}" if reason else type(e).__name__


def _strip_prefix(sd: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix) :]: v for k, v in sd.items()}
    return dict(sd)


def key_summary(keys: list[str], limit: int = 6) -> str:
    """The first `limit` keys, comma-separated, and how many more there are."""
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def load_state_dict_checked(
    module: nn.Module,
    sd: Mapping[str, torch.Tensor],
    source: str,
    allow_missing: tuple[str, ...] = (),
    assign: bool = False,
) -> None:
    """Strictly load `sd`; any difference is one GlitrError that names `source` and the keys.

    Keys starting with a prefix in `allow_missing` may be absent and keep their current values;
    `assign` adopts the tensors instead of copying them (for modules built on the meta device).
    """
    own = module.state_dict()
    missing = sorted(k for k in set(own) - set(sd) if not k.startswith(allow_missing))
    unexpected = sorted(set(sd) - set(own))
    misshaped = sorted(
        f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in set(own) & set(sd) if sd[k].shape != own[k].shape
    )
    kinds = {"missing": missing, "unexpected": unexpected, "misshaped (file vs model)": misshaped}
    parts = [f"{kind} {len(keys)}: {key_summary(keys)}" for kind, keys in kinds.items() if keys]
    if parts:
        raise GlitrError(f"{source} does not fit the model: " + "; ".join(parts))
    module.load_state_dict(sd, strict=not allow_missing, assign=assign)


def convert_original_glitr(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Convert a state dict of the original GliTr code (teacher or student) to our layout.

    The original splits the ViT's position table into `backbone.cls_embed` (1, 1, D) and
    `backbone.pos_embed` (1, n*n, D); we keep timm's single (1, 1 + n*n, D) table. A DDP
    `module.` prefix and a student's embedded `teacher.` sub-module are dropped.
    """
    sd = _strip_prefix(sd, "module.")
    out: StateDict = {}
    for key, value in sd.items():
        if key.startswith("teacher."):
            continue
        for old, new in _ORIGINAL_PREFIXES:
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        out[key] = value
    if "backbone.cls_embed" in out and "backbone.pos_embed" in out:
        out["backbone.pos_embed"] = torch.cat([out.pop("backbone.cls_embed"), out["backbone.pos_embed"]], dim=1)
    return out


def _fit_backbone(model: GliTr, sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Keep a plain ViT state dict's backbone keys and resample its position table to our grid."""
    sd = _strip_prefix(_strip_prefix(sd, "module."), "backbone.")
    own = model.backbone.state_dict()
    sd = {k: v for k, v in sd.items() if not k.startswith(("head.", "fc_norm.", "head_drop."))}
    pos = sd.get("pos_embed")
    if pos is not None and pos.shape != own["pos_embed"].shape:
        sd["pos_embed"] = resample_abs_pos_embed(pos, new_size=list(model.backbone.grid_size), num_prefix_tokens=1)
    return sd


def hub_address() -> tuple[str, int]:
    """(host, port) that a download from the Hugging Face Hub connects to: the proxy set for it
    (HTTPS_PROXY and the like), else the hub itself (HF_ENDPOINT, default huggingface.co)."""
    url = urllib.parse.urlsplit(hub.ENDPOINT)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(url.hostname or ""):
        url = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    return url.hostname or "", url.port or (443 if url.scheme == "https" else 80)


def hub_reachable(timeout: float = HUB_CHECK_TIMEOUT_S) -> bool:
    """Whether the hub (or its proxy) accepts a connection within `timeout` seconds, name lookup
    included; False at once in huggingface_hub's offline mode (HF_HUB_OFFLINE=1).

    One connection and no request: an online machine pays a round trip, an offline one learns it
    now rather than after huggingface_hub's retries of every file."""
    if hub.HF_HUB_OFFLINE:
        return False
    connected: list[bool] = []

    def connect() -> None:  # in a thread: a name lookup does not obey the socket's timeout
        with contextlib.suppress(OSError, ValueError), socket.create_connection(hub_address(), timeout=timeout):
            connected.append(True)

    thread = threading.Thread(target=connect, name="glitr-hub-check", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(connected)


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """huggingface_hub's own offline mode (what HF_HUB_OFFLINE=1 sets at import) for the block:
    downloads come from the local cache only and fail at once when the file is not there."""
    before, hub.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE, True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = before


def timm_pretrained(name: str) -> StateDict:
    """timm's pretrained weights `name` (no classifier head), downloaded once into the local cache;
    when the hub cannot be reached, from the cache only, and a `WeightsUnavailable` if they are not there."""
    if not timm.is_model(name):
        raise GlitrError(f"model.pretrained={name}: neither a file nor a timm model name (timm.list_pretrained())")
    online = hub_reachable()
    try:
        with contextlib.nullcontext() if online else hub_offline():
            return timm.create_model(name, pretrained=True, num_classes=0).state_dict()
    except Exception as e:
        if online:
            raise GlitrError(f"timm pretrained weights {name!r} could not be loaded: {e}") from None
        raise WeightsUnavailable(
            f"timm pretrained weights {name!r} (model.pretrained) are not in the local cache and "
            f"{hub.ENDPOINT} cannot be reached; ways on: a local weights file, model.pretrained=PATH.pth; "
            "a trained GliTr teacher, model.init_from=runs/NAME/checkpoints/last.pt; "
            "or random weights, model.allow_random_init=true"
        ) from None


def load_backbone(model: GliTr, source: str | Path) -> None:
    """Initialise T_f from an iBOT/DeiT-style checkpoint file (weights under `state_dict`,
    `model`, `teacher` or bare) or, for a name that is not a file, from timm's pretrained weights
    (`timm_pretrained`)."""
    if Path(source).suffix in (".pth", ".pt", ".bin") or Path(source).exists():
        obj = read_checkpoint(source)
        sd = obj
        for key in ("state_dict", "model", "teacher"):
            if isinstance(sd, dict) and key in sd and isinstance(sd[key], Mapping):
                sd = sd[key]
                break
        if not isinstance(sd, Mapping):
            raise GlitrError(f"{source}: expected a ViT state dict, found {type(sd).__name__}")
    else:
        sd = timm_pretrained(str(source))
    load_state_dict_checked(model.backbone, _fit_backbone(model, sd), str(source))


def init_student_from_teacher(student: GliTr, teacher: GliTr) -> None:
    """The student starts from all of the teacher's weights (T_f, T_c, T_l and init_loc)."""
    load_state_dict_checked(student, teacher.state_dict(), "teacher weights")


def jester_teacher_from_ssv2(sd: Mapping[str, torch.Tensor], num_frames: int) -> StateDict:
    """An SSv2 teacher's state dict made into a Jester teacher's starting point.

    The class head is dropped (new classes), and each temporal embedding keeps every k-th
    step (k = old length / num_frames, i.e. `[:, ::2]` from 16 to 8 frames).
    """
    out: StateDict = {}
    for key, value in sd.items():
        if key.startswith("classifier.head."):
            continue
        if key.endswith("temporal_embed"):
            old = value.shape[1]
            if old % num_frames:
                raise GlitrError(f"{key}: cannot take {num_frames} of {old} temporal steps evenly")
            value = value[:, :: old // num_frames].clone()
        out[key] = value
    return out


def load_jester_teacher_init(model: GliTr, ssv2_teacher: Mapping[str, torch.Tensor], source: str) -> None:
    """Start a Jester teacher from an SSv2 teacher's weights; its class head stays freshly initialised."""
    sd = jester_teacher_from_ssv2(ssv2_teacher, model.num_frames)
    load_state_dict_checked(model, sd, source, allow_missing=("classifier.head.",))
