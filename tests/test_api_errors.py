"""Specification of the Python API's errors on damaged files and mismatched grids.

``REPARegularizer.from_pretrained`` on a tampered ``repa_config.json`` or safetensors file and
``create_encoder(..., weights=garbage)`` raise only ``repa.errors`` classes whose messages name
the file and the fix; a failed ``from_pretrained`` leaves no hooks on the model. The encoder
accepts a state dict saved from its own wrapper. The grid-mismatch error names an image size
that fixes the grids for any encoder, a user's own module included.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from repa import REPARegularizer
from repa.encoders import create_encoder, save_encoder_weights
from repa.errors import ConfigError, GridMismatchError, REPAError, StateDictError, UnknownNameError
from tiny_models import ConvEncoder, TinyDiT

CONFIG, WEIGHTS = "repa_config.json", "repa_projectors.safetensors"


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x, torch.rand(x.shape[0]))


def hooks_on(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


@pytest.fixture
def saved(tmp_path):
    """A regularizer saved after one call: (folder, model, encoder, its state dict)."""
    torch.manual_seed(0)
    model, enc = TinyDiT(), ConvEncoder()
    reg = REPARegularizer(model, layers=[0, 1], encoders=enc, projector_dim=8)
    x = torch.rand(2, 3, 16, 16)
    run(model, x)
    reg(x)
    reg.save_pretrained(tmp_path)
    state = {k: v.clone() for k, v in reg.state_dict().items()}
    reg.remove()
    assert hooks_on(model) == 0
    return tmp_path, model, enc, state


def edit_config(folder, change) -> None:
    config = json.loads((folder / CONFIG).read_text())
    change(config)
    (folder / CONFIG).write_text(json.dumps(config))


def edit_weights(folder, change) -> None:
    tensors = load_file(folder / WEIGHTS)
    from safetensors import safe_open

    with safe_open(folder / WEIGHTS, "pt") as fh:
        metadata = fh.metadata()
    change(tensors)
    save_file(tensors, folder / WEIGHTS, metadata=metadata)


# --------------------------------------------------------------------------- repa_config.json
def test_a_config_that_is_not_json_is_a_config_error(saved):
    folder, model, enc, _ = saved
    (folder / CONFIG).write_text('{"layers": ["blocks.0", "blocks.1"], "encoders": [')  # truncated
    with pytest.raises(ConfigError, match=r"repa_config.json' is not valid JSON .*save the regularizer again"):
        REPARegularizer.from_pretrained(folder, model, encoders=enc)
    (folder / CONFIG).write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must hold a JSON object of settings, got list"):
        REPARegularizer.from_pretrained(folder, model, encoders=enc)
    assert hooks_on(model) == 0


def test_a_config_with_missing_fields_names_them(saved):
    folder, model, enc, _ = saved
    edit_config(folder, lambda c: [c.pop("projector_dim"), c.pop("loss")])
    with pytest.raises(ConfigError, match=r"lacks the field\(s\) \['projector_dim', 'loss'\]; save the regularizer again"):
        REPARegularizer.from_pretrained(folder, model, encoders=enc)
    assert hooks_on(model) == 0


def test_a_config_with_values_of_the_wrong_type_names_them(saved):
    folder, model, enc, _ = saved
    edit_config(folder, lambda c: c.update(projector_dim="big", input_range=3, layers="blocks.0"))
    with pytest.raises(ConfigError, match=r"layers='blocks.0' \(expected a list of module names\); projector_dim='big' "
                                          r"\(expected a positive int\); input_range=3 \(expected \[low, high\]\)"):
        REPARegularizer.from_pretrained(folder, model, encoders=enc)
    edit_config(folder, lambda c: c.update(projector_dim=8, input_range=[0, 1], layers=["blocks.0", "blocks.1"],
                                           weight={"kind": "constant", "bogus": 1}))
    with pytest.raises(ConfigError, match=r"holds an invalid setting .*bogus"):
        REPARegularizer.from_pretrained(folder, model, encoders=enc)
    edit_config(folder, lambda c: c.update(weight={"kind": "sawtooth"}))
    with pytest.raises(UnknownNameError, match="unknown schedule kind 'sawtooth'"):
        REPARegularizer.from_pretrained(folder, model, encoders=enc)
    edit_config(folder, lambda c: c.update(weight=0.5, layers=["blocks.9"]))
    with pytest.raises(REPAError):  # a module the model does not have
        REPARegularizer.from_pretrained(folder, model, encoders=enc)
    assert hooks_on(model) == 0


def test_a_missing_config_file_is_read_from_the_weights_metadata(saved):
    folder, model, enc, state = saved
    (folder / CONFIG).unlink()
    reg = REPARegularizer.from_pretrained(folder, model, encoders=enc)
    assert reg.layer_names == ["blocks.0", "blocks.1"]
    assert all(torch.equal(v, state[k]) for k, v in reg.state_dict().items())
    reg.remove()
    save_file(load_file(folder / WEIGHTS), folder / WEIGHTS)  # the same tensors, no metadata
    with pytest.raises(StateDictError, match=r"no repa_config.json beside .* and no config in its metadata"):
        REPARegularizer.from_pretrained(folder, model, encoders=enc)


# --------------------------------------------------------------------------- repa_projectors.safetensors
def test_missing_extra_reshaped_or_non_finite_tensors_are_state_dict_errors(saved):
    folder, model, enc, state = saved
    name = "projectors.0.0.weight"  # the MLP's first Linear: (projector_dim 8, hidden 32)
    assert state[name].shape == (8, 32)
    cases = [
        (lambda t: t.pop(name), rf"missing keys \['{name}'\], unexpected keys \[\]"),
        (lambda t: t.update({"projectors.9.weight": torch.zeros(2)}), r"unexpected keys \['projectors.9.weight'\]"),
        (lambda t: t.update({name: t[name].reshape(16, 16)}), rf"{name}: saved \(16, 16\), here \(8, 32\)"),
        (lambda t: t[name].view(-1).__setitem__(0, float("nan")), rf"NaN or infinite values in \['{name}'\]"),
    ]
    for change, message in cases:
        save_file({k: v.clone() for k, v in state.items()}, folder / WEIGHTS)
        edit_weights(folder, change)
        with pytest.raises(StateDictError, match=message):
            REPARegularizer.from_pretrained(folder, model, encoders=enc)
        assert hooks_on(model) == 0  # the half-built regularizer took its hooks with it


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_safetensors_file_is_a_state_dict_error(saved, damage):
    folder, model, enc, _ = saved
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(b"\x00" * 64 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(StateDictError, match=r"cannot read .*repa_projectors.safetensors.*the file is damaged"):
        REPARegularizer.from_pretrained(folder, model, encoders=enc)
    assert hooks_on(model) == 0


# --------------------------------------------------------------------------- create_encoder(weights=)
def test_create_encoder_on_garbage_weights_raises_state_dict_errors(tmp_path):
    for name, content in [("w.safetensors", b"\x07" * 100), ("w.pth", b"not a torch file"), ("w.bin", b"")]:
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(StateDictError, match=rf"cannot read .*{name}"):
            create_encoder("fmnist-vit", weights=path)
    torch.save([torch.zeros(3)], tmp_path / "list.pt")
    with pytest.raises(StateDictError, match="no tensor state dict found"):
        create_encoder("fmnist-vit", weights=tmp_path / "list.pt")
    torch.save({"unrelated.weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(StateDictError, match="do not fit encoder 'fmnist-vit'"):
        create_encoder("fmnist-vit", weights=tmp_path / "other.pt")

    torch.manual_seed(0)
    good = save_encoder_weights(create_encoder("fmnist-vit", pretrained=False), tmp_path / "good.safetensors")
    tensors = load_file(good)
    tensors["pos_embed"][0, 0, 0] = float("inf")
    save_file(tensors, tmp_path / "inf.safetensors")
    with pytest.raises(StateDictError, match=r"NaN or infinite values in 1 tensor\(s\) \(e.g. \['pos_embed'\]\)"):
        create_encoder("fmnist-vit", weights=tmp_path / "inf.safetensors")


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
def test_create_encoder_accepts_the_state_dict_of_the_frozen_encoder_itself(tmp_path, fmt):
    torch.manual_seed(3)
    enc = create_encoder("fmnist-vit", pretrained=False, resolution=28)
    state = enc.state_dict()
    assert state and all(k.startswith("model.") for k in state)  # what users save
    path = tmp_path / ("enc.pt" if fmt == "torch" else "enc.safetensors")
    if fmt == "torch":
        torch.save(state, path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    torch.manual_seed(4)
    again = create_encoder("fmnist-vit", weights=path, resolution=28)
    for key, value in state.items():
        assert torch.equal(again.state_dict()[key], value), key
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(again(x), enc(x))


# --------------------------------------------------------------------------- grid mismatch
class Stride8(nn.Module):
    """A user's own encoder: no grid(), no patch size; (B, 3, H, W) -> (B, (H/8)*(W/8), 16) tokens."""

    def __init__(self, fmap: bool = False) -> None:
        super().__init__()
        self.embed_dim, self.fmap = 16, fmap
        self.conv = nn.Conv2d(3, 16, 8, stride=8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)  # (B, 16, H/8, W/8)
        return y if self.fmap else y.flatten(2).transpose(1, 2)  # (B, N, 16)


def test_the_grid_mismatch_error_names_an_image_size_for_a_users_own_encoder():
    torch.manual_seed(0)
    model, enc = TinyDiT(size=16, patch=2), Stride8()  # model grid 16/2 = 8x8; encoder 16/8 = 2x2
    reg = REPARegularizer(model, layers=1, encoders={"mine": enc}, projector_dim=8, mismatch="error")
    x = torch.rand(2, 3, 16, 16)
    run(model, x)
    # the encoder's stride is 16 / 2 = 8, so 8 * 8 = 64 px images give it the model's 8x8 grid
    with pytest.raises(GridMismatchError, match=r"8x8 token grid but encoder 'mine' gives 2x2 for 16x16 images; "
                                                r"images of 64x64 would give the encoder a matching grid"):
        reg(x)
    assert enc(torch.zeros(1, 3, 64, 64)).shape == (1, 8 * 8, 16)  # the suggestion holds


def test_the_suggested_size_follows_each_side_of_a_feature_map_encoder():
    torch.manual_seed(0)
    model, enc = TinyDiT(size=16, patch=4), Stride8(fmap=True)  # model 4x4; encoder on 16x16: 2x2
    reg = REPARegularizer(model, layers=1, encoders={"map": enc}, projector_dim=8, mismatch="error")
    x = torch.rand(2, 3, 16, 16)
    run(model, x)
    with pytest.raises(GridMismatchError, match=r"gives 2x2 for 16x16 images; images of 32x32 would give"):
        reg(x)


def test_no_size_is_suggested_when_the_encoder_grid_does_not_follow_the_image():
    class FixedGrid(nn.Module):  # resizes every input to 32 px: the grid never changes
        embed_dim = 16

        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 16, 8, stride=8)

        def forward(self, x):
            x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear")
            return self.conv(x).flatten(2).transpose(1, 2)  # (B, 16, 16): always 4x4

    torch.manual_seed(0)
    model = TinyDiT(size=16, patch=2)
    reg = REPARegularizer(model, layers=1, encoders={"fixed": FixedGrid()}, projector_dim=8, mismatch="error")
    x = torch.rand(2, 3, 16, 16)
    run(model, x)
    with pytest.raises(GridMismatchError) as info:
        reg(x)
    assert "gives 4x4 for 16x16 images; pass mismatch='interpolate'" in str(info.value)
    assert "would give" not in str(info.value)
