import pytest
import torch

from glitr_cli.model import Locator, TemporalTransformer


def _model(fused: bool, dtype=torch.float64) -> TemporalTransformer:
    torch.manual_seed(0)
    return TemporalTransformer(8, 12, 5, max_len=6, depth=2, num_heads=3, fused_attn=fused).to(dtype).eval()


@pytest.mark.parametrize("fused", [True, False])
def test_kv_cache_steps_equal_one_causal_pass(fused):
    m = _model(fused)
    x = torch.randn(3, 6, 8, dtype=torch.float64)
    full = m(x)
    cache = m.new_cache()
    steps = torch.stack([m.step(x[:, t], cache) for t in range(6)], dim=1)
    torch.testing.assert_close(steps, full, rtol=1e-12, atol=1e-12)
    assert len(cache) == 6
    with pytest.raises(ValueError, match="at most 6"):
        m.step(x[:, 0], cache)


def test_fused_and_manual_attention_agree():
    x = torch.randn(2, 6, 8)
    torch.testing.assert_close(_model(True, torch.float32)(x), _model(False, torch.float32)(x), rtol=1e-5, atol=1e-5)


def test_output_is_causal():
    m = _model(True)
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    y = x.clone()
    y[:, 3:] += 1.0
    torch.testing.assert_close(m(x)[:, :3], m(y)[:, :3])
    assert not torch.allclose(m(x)[:, 3:], m(y)[:, 3:])


def test_locator_head_and_initial_location():
    torch.manual_seed(0)
    plain = TemporalTransformer(8, 12, 2, max_len=4, depth=1, num_heads=3, head_bias=False)
    torch.manual_seed(0)
    loc = Locator(8, 12, max_len=4, depth=1, num_heads=3)
    assert loc.head.bias is None
    torch.testing.assert_close(loc.head.weight, 0.1 * plain.head.weight)
    assert loc.init_loc.shape == (1, 1, 2) and loc.init_loc.abs().sum() == 0


@pytest.mark.parametrize("fused", [True, False])
def test_slot_cache_steps_equal_one_causal_pass(fused):
    """The exported step's cache: fixed max_len slots passed in and out, the position a tensor; each step
    gives the causal pass's output at that position and writes its keys and values into that slot only."""
    from glitr_cli.model.temporal import SlotKVCache

    m = _model(fused)
    x = torch.randn(3, 6, 8, dtype=torch.float64)
    full = m(x)
    attn = m.blocks[0].attn
    keys = values = torch.zeros(m.depth, 3, attn.num_heads, 6, attn.head_dim, dtype=torch.float64)
    for t in range(6):
        cache = SlotKVCache(keys, values, torch.tensor([t]))
        torch.testing.assert_close(m.step(x[:, t], cache), full[:, t], rtol=1e-12, atol=1e-12)
        new_keys, values = cache.stacked()
        assert torch.equal(new_keys[:, :, :, :t], keys[:, :, :, :t]) and not new_keys[:, :, :, t].eq(0).all()
        assert new_keys[:, :, :, t + 1 :].eq(0).all()
        keys = new_keys
