"""Loading checkpoints from local files: formats, containers, and errors that say what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import load_fixture
from safetensors.torch import save_file

from geodino.models.checkpoint import (
    CheckpointError,
    build_backbone,
    closest_presets,
    load_backbone,
    read_state_dict,
)


@pytest.fixture(scope="module")
def vits16_file(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A full-size dinov3_vits16 checkpoint in the official layout, stored bf16 like released files."""
    torch.manual_seed(7)
    model = build_backbone("dinov3_vits16")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("ckpt") / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"
    torch.save(state, path)
    return path, state


def _reference(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = build_backbone("dinov3_vits16")
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval()


@torch.no_grad()
def test_official_pth_loads_strictly_and_reproduces_outputs(vits16_file):
    path, state = vits16_file
    model = load_backbone("dinov3_vits16", weights=path)
    assert not model.training and next(model.parameters()).dtype == torch.float32
    x = torch.randn(1, 3, 32, 48)
    torch.testing.assert_close(model(x), _reference(state)(x), atol=0, rtol=0)
    torch.testing.assert_close(model.rope_embed.periods, state["rope_embed.periods"].float(), atol=0, rtol=0)


@torch.no_grad()
def test_safetensors_and_training_container(vits16_file, tmp_path):
    _, state = vits16_file
    st = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(st))
    wrapped = tmp_path / "training.pth"
    heads = {"teacher.dino_head.mlp.0.weight": torch.zeros(2, 2)}
    torch.save(
        {"teacher": {f"teacher.backbone.{k}": v for k, v in state.items()} | heads, "iteration": 10}, wrapped
    )
    x = torch.randn(1, 3, 32, 32)
    expected = _reference(state)(x)
    for file in (st, wrapped):
        torch.testing.assert_close(load_backbone("dinov3_vits16", weights=file)(x), expected, atol=0, rtol=0)


def test_fixture_state_dict_is_read_with_weights_only(tmp_path):
    """A pickle that is not plain tensors is refused, not executed."""

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, path)
    with pytest.raises(CheckpointError, match=r"evil\.pth.*cannot read") as err:
        read_state_dict(path)
    # torch's own message would advise weights_only=False, the unsafe step; the error says why it is refused
    assert "set to `False`" not in str(err.value) and "does not unpickle" in str(err.value)


def test_truncated_file_names_the_file(vits16_file, tmp_path):
    path, _ = vits16_file
    cut = tmp_path / "cut.pth"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    with pytest.raises(CheckpointError, match=r"cut\.pth.*truncated"):
        load_backbone("dinov3_vits16", weights=cut)


def test_missing_file_is_not_downloaded(tmp_path):
    with pytest.raises(CheckpointError, match="never downloads"):
        load_backbone("dinov3_vits16", weights=tmp_path / "nope.pth")


def test_wrong_preset_lists_mismatches_and_the_likely_preset(vits16_file):
    path, _ = vits16_file
    with pytest.raises(CheckpointError) as err:
        load_backbone("dinov3_vitb16", weights=path)
    msg = str(err.value)
    assert (
        "shape mismatches" in msg and "blocks.0.attn.qkv.weight: file (1152, 384) vs model (2304, 768)" in msg
    )
    assert "looks most like: dinov3_vits16.lvd1689m (100%)" in msg


def test_reduced_depth_file_reports_missing_blocks(tmp_path):
    fx = load_fixture("dinov3_vits16_depth4")
    path = tmp_path / "depth4.pth"
    torch.save(fx["state_dict"], path)
    with pytest.raises(CheckpointError, match=r"missing keys \(120\): blocks\.10\.attn\.proj\.bias"):
        load_backbone("dinov3_vits16", weights=path)


def test_sat_file_is_told_apart_from_web_weights():
    with torch.device("meta"):
        sat = build_backbone("dinov3_vitl16.sat493m").state_dict()
    ranking = closest_presets(sat)
    assert ranking[0] == ("dinov3_vitl16.sat493m", 1.0)
    assert ranking[1][0] == "dinov3_vitl16.lvd1689m" and ranking[1][1] < 1.0
