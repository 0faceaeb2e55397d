"""RoPE: identity at position 0, relative-position property, dtype preserved."""

import torch

from fsa_train.model.rope import Rotary


def test_position_zero_is_identity():
    rope = Rotary(16)
    x = torch.randn(5, 3, 16)
    assert torch.equal(rope(x, torch.zeros(5, dtype=torch.long)), x)


def test_dot_product_depends_only_on_offset():
    rope = Rotary(32)
    q = torch.randn(1, 1, 32, dtype=torch.float64)
    k = torch.randn(1, 1, 32, dtype=torch.float64)

    def score(m: int, n: int) -> float:
        qm = rope(q, torch.tensor([m]))
        kn = rope(k, torch.tensor([n]))
        return float((qm * kn).sum())

    assert abs(score(7, 3) - score(104, 100)) < 1e-9
    assert abs(score(7, 3) - score(3, 7)) > 1e-6


def test_rotation_preserves_norm_and_dtype():
    rope = Rotary(64)
    x = torch.randn(10, 2, 64).to(torch.bfloat16)
    y = rope(x, torch.arange(10))
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float().norm(dim=-1), x.float().norm(dim=-1), rtol=2e-2, atol=0)
