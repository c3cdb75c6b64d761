"""Checkpoints: atomic writes, last.pt always complete, pruning, safe loading, RNG round trip."""

from __future__ import annotations

import argparse
import os
import random

import numpy as np
import pytest
import torch

from glitr_cli.engine import checkpoint as ck
from glitr_cli.engine.checkpoint import (
    LAST,
    cuda_rng_state,
    load_checkpoint,
    prune,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from glitr_cli.errors import GlitrError


def state(step: int) -> dict:
    return {
        "kind": "teacher",
        "model": {"w": torch.full((3,), float(step))},
        "recipe": {"name": "x"},
        "class_names": ["a", "b"],
        "progress": {"epoch": 0, "step": step},
        "rng": [rng_state()],
    }


def test_save_load_last_and_prune(tmp_path):
    for step in (1, 2, 3, 4):
        path = save_checkpoint(state(step), tmp_path, step, keep_last=2)
        assert path.name == f"step_{step:08d}.pt"
        last = load_checkpoint(tmp_path / LAST)
        assert last["progress"]["step"] == step and torch.equal(last["model"]["w"], torch.full((3,), float(step)))
    assert sorted(p.name for p in tmp_path.iterdir()) == [LAST, "step_00000003.pt", "step_00000004.pt"]
    assert os.path.samefile(tmp_path / LAST, tmp_path / "step_00000004.pt")  # a link, not a second copy
    save_checkpoint(state(5), tmp_path, 5, keep_last=0)  # 0 keeps all
    assert len(list(tmp_path.glob("step_*.pt"))) == 3


def test_a_save_that_dies_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(state(1), tmp_path, 1, keep_last=3)
    real_save = torch.save

    def dying_save(obj, f):  # writes half a file, then the process "dies"
        real_save(obj, f)
        f.truncate(100)
        raise KeyboardInterrupt

    monkeypatch.setattr(ck.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(state(2), tmp_path, 2, keep_last=3)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / LAST)["progress"]["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [LAST, "step_00000001.pt"]  # no partial files


def test_stale_temp_files_are_cleaned(tmp_path):
    (tmp_path / ".step_00000009.pt.tmp-123").write_bytes(b"half")
    prune(tmp_path, keep_last=3)
    assert not list(tmp_path.iterdir())


def test_corrupt_truncated_foreign_and_missing_are_reported(tmp_path):
    save_checkpoint(state(1), tmp_path, 1, keep_last=3)
    data = (tmp_path / LAST).read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    flipped = tmp_path / "flipped.pt"
    flipped.write_bytes(data[:-64] + bytes(64))
    foreign = tmp_path / "foreign.pt"
    torch.save({"w": torch.zeros(2)}, foreign)
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"format": ck.FORMAT, "obj": argparse.Namespace(a=1)}, unsafe)
    for path in (truncated, garbage, flipped):
        with pytest.raises(GlitrError, match=str(path.name)):
            load_checkpoint(path)
    with pytest.raises(GlitrError, match="not a glitr training checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(GlitrError, match="unsafe.pt"):  # weights_only refuses arbitrary objects
        load_checkpoint(unsafe)
    with pytest.raises(GlitrError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
    incomplete = tmp_path / "incomplete.pt"
    torch.save({"format": ck.FORMAT, "version": 1, "kind": "teacher"}, incomplete)
    with pytest.raises(GlitrError, match="incomplete checkpoint"):
        load_checkpoint(incomplete)


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.normal()  # leave a cached gaussian in NumPy's state
    save_checkpoint(state(1), tmp_path, 1, keep_last=1)
    expected = (random.random(), np.random.rand(3).tolist(), torch.rand(3))
    set_rng_state(load_checkpoint(tmp_path / LAST)["rng"][0])
    got = (random.random(), np.random.rand(3).tolist(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_a_checkpoint_from_a_node_with_more_gpus_gives_each_device_its_own_generator(tmp_path):
    """The CUDA state saved is the saving process's own device's; checkpoints that held every
    visible device's (a list) give a device its entry, or nothing where the node had fewer."""
    eight = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]  # get_rng_state_all() on 8 GPUs
    saved = state(1)
    saved["rng"][0]["cuda"] = eight
    save_checkpoint(saved, tmp_path, 1, keep_last=1)
    loaded = load_checkpoint(tmp_path / LAST)["rng"][0]
    assert torch.equal(cuda_rng_state(loaded["cuda"], 3), eight[3])
    assert cuda_rng_state(loaded["cuda"][:2], 3) is None
    own = torch.full((16,), 9, dtype=torch.uint8)
    assert cuda_rng_state(own, 3) is own
    set_rng_state(loaded, torch.device("cpu"))  # a CPU machine restores the rest


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_generator_saved_where_more_gpus_were_visible_is_restored(tmp_path):
    device = torch.device("cuda", 0)
    torch.cuda.manual_seed(5)
    own = torch.cuda.get_rng_state(device)
    expected = torch.rand(4, device=device)
    torch.cuda.manual_seed(6)
    visible = torch.cuda.device_count()
    saved = state(1)
    saved["rng"][0]["cuda"] = [own, *[torch.cuda.get_rng_state(device)] * (visible + 3)]  # more GPUs than here
    save_checkpoint(saved, tmp_path, 1, keep_last=1)
    set_rng_state(load_checkpoint(tmp_path / LAST)["rng"][0], device)
    assert torch.equal(torch.rand(4, device=device), expected)
    assert isinstance(rng_state(device)["cuda"], torch.Tensor)  # its own device's, not a list of all
