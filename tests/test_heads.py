"""DINO / iBOT projection head: official layout and names, forward against plain matrix algebra.

Reference: ``shared/notes/dinov3-official.md`` §3.4 (heads), §5 item 12 (no weight norm).
"""

from __future__ import annotations

import math

import pytest
import torch

from geodino.train import DINOHead


def naive_head(x: torch.Tensor, state: dict[str, torch.Tensor], n_linear: int) -> torch.Tensor:
    """Linear → exact GELU → ... → Linear, divide by the L2 norm, bias-free prototype layer (float64)."""
    x = x.double()
    for i in range(n_linear):
        x = x @ state[f"mlp.{2 * i}.weight"].double().T + state[f"mlp.{2 * i}.bias"].double()
        if i < n_linear - 1:
            x = 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
    x = x / x.pow(2).sum(-1, keepdim=True).sqrt()
    return x @ state["last_layer.weight"].double().T


def test_official_parameter_names_and_shapes() -> None:
    head = DINOHead(48, 300, hidden_dim=64, bottleneck_dim=16)
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert shapes == {
        "mlp.0.weight": (64, 48),
        "mlp.0.bias": (64,),
        "mlp.2.weight": (64, 64),
        "mlp.2.bias": (64,),
        "mlp.4.weight": (16, 64),
        "mlp.4.bias": (16,),
        "last_layer.weight": (300, 16),  # no bias, no weight-norm parametrisation (weight_g / weight_v)
    }
    assert [type(m).__name__ for m in head.mlp] == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    assert head.mlp[1].approximate == "none"


def test_loads_official_layout_state_dict_strictly() -> None:
    source = DINOHead(48, 300, hidden_dim=64, bottleneck_dim=16)
    official = {k: torch.randn_like(v) for k, v in source.state_dict().items()}  # as in a training ckpt
    head = DINOHead(48, 300, hidden_dim=64, bottleneck_dim=16)
    head.load_state_dict(official, strict=True)
    x = torch.randn(5, 48)
    torch.testing.assert_close(head(x).double(), naive_head(x, official, 3), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("nlayers", [2, 3, 4])
def test_forward_matches_naive(nlayers: int) -> None:
    head = DINOHead(32, 50, nlayers=nlayers, hidden_dim=24, bottleneck_dim=8)
    for p in head.parameters():  # non-trivial biases too
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(4, 32)
    torch.testing.assert_close(
        head(x).double(), naive_head(x, head.state_dict(), nlayers), rtol=1e-5, atol=1e-6
    )
    assert len(head.mlp) == 2 * nlayers - 1


def test_single_layer_mlp_is_a_bare_linear() -> None:
    head = DINOHead(32, 50, nlayers=1, bottleneck_dim=8)
    assert set(head.state_dict()) == {"mlp.weight", "mlp.bias", "last_layer.weight"}
    x = torch.randn(3, 32)
    z = x @ head.mlp.weight.T + head.mlp.bias
    expected = (z / z.norm(dim=-1, keepdim=True)) @ head.last_layer.weight.T
    torch.testing.assert_close(head(x), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="nlayers"):
        DINOHead(32, 50, nlayers=0)


def test_truncated_normal_init() -> None:
    head = DINOHead(128, 4096, hidden_dim=256, bottleneck_dim=128)
    for name, p in head.named_parameters():
        if name.endswith("bias"):
            assert torch.count_nonzero(p) == 0, name
        else:
            assert p.std().item() == pytest.approx(0.02, rel=0.05), name
            assert abs(p.mean().item()) < 2e-3, name


def test_logits_are_bounded_by_prototype_norms_and_gradients_flow() -> None:
    head = DINOHead(16, 40, hidden_dim=32, bottleneck_dim=8)
    x = torch.randn(6, 16) * 100
    logits = head(x)
    bound = head.last_layer.weight.norm(dim=-1)  # |<w_k, unit vector>| <= ||w_k||
    assert (logits.abs() <= bound + 1e-6).all()
    logits.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
