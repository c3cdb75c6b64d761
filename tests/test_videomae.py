"""VideoMAE classifier (glitr_cli/model/videomae.py): equal to the original on the reference fixture, loader errors.

The fixture folder (tests/fixtures/reference-videomae, plus any folders listed in GLITR_VIDEOMAE_FIXTURES,
os.pathsep-separated) defines the weights (seeded numpy formula + sha256 per tensor), the input, the expected outputs
and the tolerances; nothing about them is hard-coded here.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from reference_utils import assert_close, fixture_folders, sha256_le

from glitr_cli.errors import GlitrError
from glitr_cli.model.videomae import VideoMAE, build_videomae, load_videomae

FIXTURE_DIR = Path(__file__).parent / "fixtures" / "reference-videomae"
ENV_VAR = "GLITR_VIDEOMAE_FIXTURES"
TINY = dict(num_frames=4, img_size=32, patch_size=16, tubelet_size=2, embed_dim=64, depth=2, num_heads=4)

# --------------------------------------------------------------------------------------------- fixture folder reading


@dataclass
class Fixture:
    folder: Path
    state_dict: dict[str, torch.Tensor]  # regenerated float32 weights, sha256-checked
    x: np.ndarray  # (B, C, T, H, W) float32
    model_kw: dict
    expected: dict[str, np.ndarray]
    tolerances: dict[str, dict[str, float]]


_RULE = re.compile(r"^(?:(?P<offset>\d+(?:\.\d+)?) \+ )?(?P<scale>\d+(?:\.\d+)?)\*N$")
_INPUT = re.compile(
    r"RandomState\((?P<seed>\d+)\)\.standard_normal\(\((?P<shape>[\d,\s]+)\)\)\.astype\(numpy\.float32\)"
)


def _weights(keys: dict) -> dict[str, np.ndarray]:
    """Regenerate every tensor from keys.json's per-key rule, in float32 arithmetic, and check its sha256."""
    entries = keys["keys"]
    names = [e["key"] for e in entries]
    assert names == sorted(names), "keys.json keys are not in sorted() order"
    assert len(entries) == keys["num_keys"], f"keys.json lists {len(entries)} keys, num_keys says {keys['num_keys']}"
    rule_text = keys["weight_formula"]["layernorm_weight_rule"]
    ln_suffixes = tuple(re.findall(r"'([^']+)'", rule_text.split("(")[0]))
    assert ln_suffixes, f"no quoted suffixes in layernorm_weight_rule {rule_text!r}"
    ln_keys = set(keys["layernorm_weight_keys"])
    out, bad = {}, []
    for i, e in enumerate(entries):
        assert e["index"] == i and e["rng_seed"] == keys["seed"] + i, f"{e['key']}: index/rng_seed out of step"
        m = _RULE.match(e["rule"])
        assert m and e["rule"] in keys["weight_formula"], f"{e['key']}: unknown weight rule {e['rule']!r}"
        is_ln = e["key"].endswith(ln_suffixes)
        assert is_ln == (e["key"] in ln_keys) == (m["offset"] is not None), f"{e['key']}: LayerNorm rule disagrees"
        n = np.random.RandomState(e["rng_seed"]).standard_normal(e["shape"]).astype(np.float32)
        w = np.float32(m["scale"]) * n
        if m["offset"] is not None:
            w = np.float32(m["offset"]) + w
        assert w.dtype == np.float32 and list(w.shape) == e["shape"]
        if sha256_le(w) != e["sha256_float32_le"]:
            bad.append(e["key"])
        out[e["key"]] = w
    assert not bad, f"regenerated weights differ from keys.json sha256 for {len(bad)} keys: {bad[:5]}"
    return out


def _model_kw(weights: dict[str, np.ndarray], x_shape: tuple[int, ...]) -> dict:
    """Architecture from the tensor shapes and the input shape (head dim 64, as in every VideoMAE ViT-S/B/L)."""
    embed_dim, in_chans, tubelet, patch, patch_w = weights["patch_embed.proj.weight"].shape
    _, c, t, h, w = x_shape
    assert patch == patch_w and h == w and c == in_chans, f"input {x_shape} does not fit the patch embedding"
    return dict(
        num_classes=weights["head.weight"].shape[0],
        num_frames=t,
        img_size=h,
        patch_size=patch,
        tubelet_size=tubelet,
        in_chans=in_chans,
        embed_dim=embed_dim,
        depth=len({k.split(".")[1] for k in weights if k.startswith("blocks.")}),
        num_heads=embed_dim // 64,
        mlp_ratio=weights["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
    )


def read_fixture(folder: Path) -> Fixture:
    """Everything the reference check needs; a missing or malformed folder fails the test (never skips)."""
    if not folder.is_dir():
        pytest.fail(f"VideoMAE fixture folder {folder} does not exist")
    try:
        keys = json.loads((folder / "keys.json").read_text())
        tolerances = json.loads((folder / "tolerances.json").read_text())["arrays"]
        with np.load(folder / "expected.npz") as z:
            expected = {k: z[k] for k in z.files}
        m = _INPUT.search(keys["input"])
        assert m, f"cannot parse the input recipe {keys['input']!r}"
        shape = tuple(int(s) for s in m["shape"].split(",") if s.strip())
        x = np.random.RandomState(int(m["seed"])).standard_normal(shape).astype(np.float32)
        weights = _weights(keys)
        model_kw = _model_kw(weights, shape)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AssertionError) as e:
        pytest.fail(f"malformed VideoMAE fixture folder {folder}: {type(e).__name__}: {e}")
    missing = sorted({"logits", "pooled_features", "f64_logits", "f64_pooled_features"} - set(expected))
    untested = sorted(set(expected) - set(tolerances))
    if missing or untested:
        pytest.fail(
            f"malformed VideoMAE fixture folder {folder}: arrays missing {missing}, without tolerance {untested}"
        )
    state_dict = {k: torch.from_numpy(v) for k, v in weights.items()}
    return Fixture(folder, state_dict, x, model_kw, expected, tolerances)


# -------------------------------------------------------------------------------------------------- reference check


@torch.no_grad()
def _outputs(model: VideoMAE, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    tokens = model.forward_features(x)  # (B, N, D); one pass feeds both outputs, exactly as forward() does
    return model.forward_head(tokens).numpy(), model.forward_head(tokens, pre_logits=True).numpy()


@pytest.mark.slow  # 18-24 s on 2 CPU cores: ~3 s weights, 3 checkpoint round trips, 2x f32 + 1x f64 ViT-B forward
@pytest.mark.parametrize("folder", fixture_folders("reference-videomae", ENV_VAR), ids=lambda p: p.name)
def test_reference(folder: Path, tmp_path: Path) -> None:
    """Released-checkpoint layouts load; float32 (fused and manual attention) and float64 match the original."""
    fx = read_fixture(folder)
    model = None
    for layout in ("module", "model", "bare"):
        path = tmp_path / f"videomae-{layout}.pt"
        torch.save(fx.state_dict if layout == "bare" else {layout: fx.state_dict, "epoch": 29}, path)
        model = load_videomae(path, **{k: v for k, v in fx.model_kw.items() if k != "num_classes"}).freeze()
        assert model.num_classes == fx.model_kw["num_classes"]  # taken from the checkpoint's head
        loaded = model.state_dict()
        assert loaded.keys() == fx.state_dict.keys()
        assert all(torch.equal(loaded[k], v) for k, v in fx.state_dict.items()), f"{layout}: weights changed on load"
        path.unlink()
    assert model is not None

    x = torch.from_numpy(fx.x)
    runs = {"": (torch.float32, (True, False)), "f64_": (torch.float64, (True,))}
    for prefix, (dtype, fused_paths) in runs.items():
        model.to(dtype)
        for fused in fused_paths:
            model.set_fused_attn(fused)
            logits, pooled = _outputs(model, x.to(dtype))
            assert logits.dtype == pooled.dtype == {torch.float32: np.float32, torch.float64: np.float64}[dtype]
            for name, actual in (("logits", logits), ("pooled_features", pooled)):
                tol = fx.tolerances[prefix + name]
                label = f"{folder.name}: {prefix}{name} ({'fused' if fused else 'manual'} attention)"
                assert_close(label, actual, fx.expected[prefix + name], tol["rtol"], tol["atol"])


def test_malformed_fixture_folder_fails(tmp_path: Path) -> None:
    """A listed folder that is missing or broken is a failure, not a skip."""
    with pytest.raises(pytest.fail.Exception, match="does not exist"):
        read_fixture(tmp_path / "nope")
    (tmp_path / "keys.json").write_text("{}")
    with pytest.raises(pytest.fail.Exception, match="malformed"):
        read_fixture(tmp_path)


def test_fixture_folders_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(ENV_VAR, os.pathsep.join([str(tmp_path / "a"), "", str(tmp_path / "b")]))
    assert fixture_folders("reference-videomae", ENV_VAR) == [FIXTURE_DIR, tmp_path / "a", tmp_path / "b"]


# ------------------------------------------------------------------------------------------------------- tiny model


def _tiny(seed: int = 0, **kw) -> VideoMAE:
    torch.manual_seed(seed)
    model = build_videomae(num_classes=5, **{**TINY, **kw})
    with torch.no_grad():  # non-trivial biases and norms so every term of the block is exercised
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _clip(batch: int = 2, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, TINY["num_frames"], TINY["img_size"], TINY["img_size"], generator=g)  # (B, C, T, H, W)
    return x.to(dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_fused_and_manual_attention_agree(dtype: torch.dtype, tol: float) -> None:
    model = _tiny().to(dtype)
    x = _clip(dtype=dtype)
    with torch.no_grad():
        model.set_fused_attn(True)
        fused = model.forward_features(x)
        model.set_fused_attn(False)
        manual = model.forward_features(x)
    assert all(not blk.attn.fused_attn for blk in model.blocks)
    torch.testing.assert_close(fused, manual, rtol=tol, atol=tol)


def test_forward_clip_takes_btchw() -> None:
    model = _tiny()
    x = _clip()  # (B, C, T, H, W)
    with torch.no_grad():
        expected = model(x)
        got = model.forward_clip(x.transpose(1, 2).contiguous())  # (B, T, C, H, W)
        pooled = model.forward_clip(x.transpose(1, 2), pre_logits=True)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert got.shape == (2, 5) and pooled.shape == (2, TINY["embed_dim"])
    with pytest.raises(GlitrError, match="forward_clip"):
        model(x.transpose(1, 2))  # wrong layout is a clear error, not a shape crash deep inside


def test_pos_embed_is_fixed_and_not_saved() -> None:
    model = _tiny()
    assert "pos_embed" not in model.state_dict()
    assert not any(name == "pos_embed" for name, _ in model.named_parameters())
    table = model.pos_embed[0].double()  # (N, D)
    n, d = table.shape
    p, i = 5, 3
    angle = p / 10000 ** (2 * i / d)
    assert n == (TINY["num_frames"] // TINY["tubelet_size"]) * (TINY["img_size"] // TINY["patch_size"]) ** 2
    assert table[p, 2 * i].item() == pytest.approx(np.sin(angle), abs=1e-7)
    assert table[p, 2 * i + 1].item() == pytest.approx(np.cos(angle), abs=1e-7)
    assert model.double().pos_embed.dtype == torch.float64


def test_freeze() -> None:
    model = _tiny().train().freeze()
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_grad_checkpointing_gives_the_same_logits_and_gradients() -> None:
    x = _clip().requires_grad_()
    results = []
    for checkpointing in (False, True):
        model = _tiny()
        model.set_grad_checkpointing(checkpointing)
        logits = model(x)
        grads = torch.autograd.grad(logits.square().sum(), [x, *model.parameters()])
        results.append((logits.detach(), grads))
    torch.testing.assert_close(results[1], results[0], rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------- loader and errors


def _save(path: Path, obj: object) -> Path:
    torch.save(obj, path)
    return path


def test_loader_layouts_prefixes_and_args(tmp_path: Path) -> None:
    """model / module / bare, ``backbone.``/``encoder.`` prefixes, and a plain-path checkpoint carrying ``args``."""
    import argparse

    sd = _tiny().state_dict()
    x = _clip()
    with torch.no_grad():
        expected = _tiny()(x)
    checkpoints = {
        "model": {"model": sd, "optimizer": {}, "epoch": 3, "args": argparse.Namespace(nb_classes=5, lr=1e-3)},
        "module": {"module": sd, "global_steps": 10},
        "bare": sd,
        "backbone": {"module": {f"backbone.{k}": v for k, v in sd.items()}},
        "encoder": {f"encoder.{k}": v for k, v in sd.items()},
    }
    for name, ckpt in checkpoints.items():
        model = load_videomae(_save(tmp_path / f"{name}.pt", ckpt), **TINY).freeze()
        assert model.num_classes == 5, name
        with torch.no_grad():
            torch.testing.assert_close(model(x), expected, rtol=0, atol=0, msg=name)
    double = load_videomae(tmp_path / "bare.pt", num_classes=5, fused_attn=False, **TINY).double().freeze()
    with torch.no_grad():
        torch.testing.assert_close(double(x.double()), expected.double(), rtol=1e-4, atol=1e-5)
    # a half-precision checkpoint becomes float32 trainable parameters
    half = load_videomae(_save(tmp_path / "half.pt", {k: v.half() for k, v in sd.items()}), **TINY)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in half.parameters())
    assert half.training and half.pos_embed.dtype == torch.float32


def _one_line_error(path: Path, **kw) -> str:
    with pytest.raises(GlitrError) as info:
        load_videomae(path, **{**TINY, **kw})
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg, msg
    return msg


def test_error_missing_key(tmp_path: Path) -> None:
    sd = _tiny().state_dict()
    del sd["blocks.1.attn.q_bias"]
    msg = _one_line_error(_save(tmp_path / "missing.pt", {"module": sd}))
    assert "missing 1: blocks.1.attn.q_bias" in msg and "unexpected" not in msg


def test_error_unexpected_key(tmp_path: Path) -> None:
    sd = _tiny().state_dict()
    sd["pos_embed"] = torch.zeros(1, 16, TINY["embed_dim"])  # the learnable-position variant
    sd["blocks.0.attn.k_bias"] = torch.zeros(TINY["embed_dim"])
    msg = _one_line_error(_save(tmp_path / "unexpected.pt", {"model": sd}))
    assert "unexpected 2: blocks.0.attn.k_bias, pos_embed" in msg and "missing" not in msg


def test_error_misshaped_key(tmp_path: Path) -> None:
    sd = _tiny().state_dict()
    sd["blocks.0.mlp.fc1.bias"] = torch.zeros(7)
    msg = _one_line_error(_save(tmp_path / "misshaped.pt", sd))
    assert "misshaped (file vs model) 1: blocks.0.mlp.fc1.bias (7,) vs (256,)" in msg
    # a head for another class count, when the caller asks for a fixed one
    msg = _one_line_error(_save(tmp_path / "head.pt", _tiny().state_dict()), num_classes=174)
    assert "head.weight (5, 64) vs (174, 64)" in msg and "head.bias (5,) vs (174,)" in msg


def test_error_long_key_list_is_truncated(tmp_path: Path) -> None:
    sd = {k: v for k, v in _tiny().state_dict().items() if not k.startswith("blocks.")}
    msg = _one_line_error(_save(tmp_path / "no-blocks.pt", sd))
    n_block_keys = sum(k.startswith("blocks.") for k in _tiny().state_dict())
    assert f"missing {n_block_keys}:" in msg and f"(+{n_block_keys - 6} more)" in msg


@pytest.mark.parametrize("content", [b"\x00garbage\xff" * 100, b"", "truncated"], ids=["garbage", "empty", "truncated"])
def test_error_not_a_checkpoint(tmp_path: Path, content: bytes | str) -> None:
    path = tmp_path / "broken.pt"
    if content == "truncated":
        full = _save(tmp_path / "full.pt", {"module": _tiny().state_dict()}).read_bytes()
        content = full[: len(full) // 2]
    path.write_bytes(content)
    msg = _one_line_error(path)
    assert "not a readable PyTorch checkpoint" in msg and "\x1b" not in msg


def test_error_not_a_state_dict(tmp_path: Path) -> None:
    assert "not a VideoMAE" in _one_line_error(_save(tmp_path / "list.pt", [1, 2, 3]))
    assert "non-tensor entries" in _one_line_error(_save(tmp_path / "odd.pt", {"model": {"head.weight": 3}}))
    assert "no such checkpoint file" in _one_line_error(tmp_path / "absent.pt")
