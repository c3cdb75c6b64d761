import pytest
import torch
from model_helpers import tiny_glitr

from glitr_cli.errors import GlitrError
from glitr_cli.model.weights import (
    convert_original_glitr,
    init_student_from_teacher,
    load_backbone,
    load_jester_teacher_init,
    load_state_dict_checked,
    read_checkpoint,
)


def _to_original_layout(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our keys written the way the original GliTr code names them (the inverse of the importer)."""
    out = {}
    for k, v in sd.items():
        k = k.replace("classifier.input_proj.", "temporal_head.patch_embed.embed_layer.")
        k = k.replace("locator.input_proj.", "temploc_head.patch_embed.embed_layer.")
        k = k.replace("temporal_embed", "tmp_embed")
        k = k.replace("classifier.", "temporal_head.").replace("locator.", "temploc_head.")
        out[k] = v
    pos = out.pop("backbone.pos_embed")
    out["backbone.cls_embed"], out["backbone.pos_embed"] = pos[:, :1], pos[:, 1:]
    return out


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sb = b.state_dict()
    return all(torch.equal(v, sb[k]) for k, v in a.state_dict().items())


def test_original_student_state_dict_with_ddp_prefix_and_embedded_teacher():
    source, teacher = tiny_glitr(0), tiny_glitr(1)
    sd = _to_original_layout(source.state_dict())
    sd.update({f"teacher.{k}": v for k, v in _to_original_layout(teacher.state_dict()).items()})
    target = tiny_glitr(2)
    load_state_dict_checked(target, convert_original_glitr({f"module.{k}": v for k, v in sd.items()}), "original")
    assert _same_weights(target, source)


def test_ibot_backbone_with_projection_head_and_other_grid(tmp_path):
    source = tiny_glitr(0, img_size=48)  # 6x6 patch grid; our model has 4x4
    sd = {k: v for k, v in source.backbone.state_dict().items()}
    sd["head.mlp.0.weight"] = torch.randn(8, 16)
    torch.save({"state_dict": sd, "epoch": 100}, tmp_path / "ibot.pth")
    target = tiny_glitr(1)
    load_backbone(target, tmp_path / "ibot.pth")
    own = target.backbone.state_dict()
    torch.testing.assert_close(own["blocks.0.attn.qkv.weight"], sd["blocks.0.attn.qkv.weight"])
    torch.testing.assert_close(own["pos_embed"][:, 0], sd["pos_embed"][:, 0])  # class entry kept
    assert own["pos_embed"].shape == (1, 17, 16)


def test_jester_teacher_from_ssv2_teacher():
    ssv2 = tiny_glitr(0, num_frames=10, num_classes=7)
    jester = tiny_glitr(1)
    head_before = jester.classifier.head.weight.clone()
    load_jester_teacher_init(jester, ssv2.state_dict(), "ssv2 teacher")
    torch.testing.assert_close(jester.classifier.temporal_embed, ssv2.classifier.temporal_embed[:, ::2])
    torch.testing.assert_close(jester.locator.temporal_embed, ssv2.locator.temporal_embed[:, ::2])
    torch.testing.assert_close(jester.backbone.pos_embed, ssv2.backbone.pos_embed)
    torch.testing.assert_close(jester.classifier.head.weight, head_before)


def test_student_starts_from_teacher():
    student, teacher = tiny_glitr(0), tiny_glitr(1)
    init_student_from_teacher(student, teacher)
    assert _same_weights(student, teacher)


def test_key_differences_are_one_clear_line():
    model = tiny_glitr()
    sd = model.state_dict()
    sd.pop("locator.init_loc")
    sd["locator.extra"] = torch.zeros(1)
    sd["classifier.head.weight"] = torch.zeros(9, 32)
    with pytest.raises(GlitrError) as e:
        load_state_dict_checked(model, sd, "bad.pt")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("bad.pt does not fit the model")
    assert "missing 1: locator.init_loc" in msg and "unexpected 1: locator.extra" in msg
    assert "classifier.head.weight (9, 32) vs (4, 32)" in msg


class _NotAllowed:
    pass


@pytest.mark.parametrize("content", ["garbage", "truncated", "pickle", "missing"])
def test_unreadable_files_are_reported(tmp_path, content):
    path = tmp_path / "ckpt.pt"
    if content == "garbage":
        path.write_bytes(b"\x00not a checkpoint" * 10)
    elif content == "truncated":
        torch.save(tiny_glitr().state_dict(), path)
        path.write_bytes(path.read_bytes()[:500])
    elif content == "pickle":
        torch.save({"obj": _NotAllowed()}, path)  # refused by weights_only loading
    with pytest.raises(GlitrError, match=str(path)):
        read_checkpoint(path)
