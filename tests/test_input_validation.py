"""What the regularizer refuses: non-finite images and targets, bad weights, empty batches.

A NaN that reaches the alignment loss silently turns a whole training run into NaN; each bad
input here must stop at the call with a ``repa.errors`` class whose message names the value
(the encoder, the step, the shape) and the fix. ``check_inputs=False`` switches the per-call
data checks off for users who guarantee their inputs.
"""

from __future__ import annotations

import math

import pytest
import torch

from repa import REPARegularizer, build_projector
from repa.errors import ConfigError, InputRangeError, NonFiniteInputError, ShapeMismatchError
from repa.schedules import weight_at_step
from tiny_models import ConvEncoder, TinyDiT


def _forward(model: torch.nn.Module, x: torch.Tensor) -> None:
    model(torch.randn_like(x), torch.rand(x.shape[0]))


@pytest.fixture
def parts():
    torch.manual_seed(0)
    return TinyDiT(depth=2), ConvEncoder(dim=24), torch.rand(2, 3, 16, 16)


# ----------------------------------------------------------------------------- images


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_images_raise_input_range_error(parts, bad):
    model, enc, x = parts
    reg = REPARegularizer(model, layers="blocks.1", encoders=enc, projector_dim=16)
    x = x.clone()
    x[1, 2, 3, 4] = bad  # one pixel of the second image
    _forward(model, x)
    with pytest.raises(InputRangeError, match=r"images hold non-finite values"):
        reg(x)
    # the class is specific too, and the regularizer is usable after the error
    _forward(model, x)
    with pytest.raises(NonFiniteInputError):
        reg(x)
    _forward(model, x)
    assert torch.isfinite(reg(x.nan_to_num(0.5, 0.5, 0.5)))


def test_nan_images_in_another_input_range_are_refused(parts):
    model, enc, x = parts
    reg = REPARegularizer(model, layers="blocks.1", encoders=enc, projector_dim=16, input_range=(-1, 1))
    x = x * 2 - 1
    x[0, 0, 0, 0] = float("nan")
    _forward(model, x)
    with pytest.raises(InputRangeError, match=r"non-finite"):
        reg(x)


# ----------------------------------------------------------------------------- features=


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_features_raise_naming_the_encoder(parts, bad):
    model, enc, x = parts
    reg = REPARegularizer(model, layers="blocks.1", encoders={"teacher-a": enc, "teacher-b": 24}, projector_dim=16)
    feats = {"teacher-a": enc(x).detach(), "teacher-b": torch.randn(2, 16, 24)}  # (B, N, D) each
    feats["teacher-b"][0, 5, 7] = bad
    _forward(model, x)
    with pytest.raises(NonFiniteInputError, match=r"features= for encoder 'teacher-b' hold (1 NaN and 0|0 NaN and 1) Inf"):
        reg(features=feats)
    assert issubclass(NonFiniteInputError, InputRangeError) and issubclass(NonFiniteInputError, ValueError)


def test_non_finite_feature_map_and_list_forms_are_checked(parts):
    model, enc, x = parts
    reg = REPARegularizer(model, layers="blocks.1", encoders=24, projector_dim=16)
    fmap = torch.randn(2, 24, 4, 4)  # (B, D, h, w)
    fmap[1, 0, 0, 0] = float("nan")
    _forward(model, x)
    with pytest.raises(NonFiniteInputError, match=r"encoder 'encoder0'"):
        reg(features=[fmap])


def test_check_inputs_false_skips_the_data_checks(parts):
    """The opt-out really is an opt-out: the same NaN features reach the loss unchecked."""
    model, enc, x = parts
    reg = REPARegularizer(model, layers="blocks.1", encoders=24, projector_dim=16, check_inputs=False)
    feats = torch.randn(2, 16, 24)
    feats[0, 0, 0] = float("nan")
    _forward(model, x)
    assert math.isnan(float(reg(features=feats).detach()))


def test_finite_features_pass_and_give_a_finite_loss(parts):
    model, enc, x = parts
    reg = REPARegularizer(model, layers="blocks.1", encoders=enc, projector_dim=16)
    _forward(model, x)
    assert torch.isfinite(reg(features=enc(x).detach()))


# ----------------------------------------------------------------------------- weight schedules


@pytest.mark.parametrize("value", [float("nan"), -0.25, float("inf")])
def test_a_schedule_returning_nan_or_negative_raises_at_that_step(parts, value):
    model, enc, x = parts
    schedule = lambda step: 0.5 if step < 2 else value  # noqa: E731 - a user's callable
    reg = REPARegularizer(model, layers="blocks.1", encoders=enc, projector_dim=16, weight=schedule)
    for _ in range(2):  # steps 0 and 1 are fine
        _forward(model, x)
        reg(x)
    _forward(model, x)
    with pytest.raises(ConfigError, match=rf"returned {value!r} at step 2; a weight must be a finite number >= 0"):
        reg(x)
    with pytest.raises(ConfigError, match=r"at step 7"):
        reg.weight_at(7)
    assert reg.weight_at(1) == 0.5


def test_a_schedule_returning_a_non_number_raises():
    with pytest.raises(ConfigError, match=r"returned a non-number at step 3"):
        weight_at_step(lambda step: "half", 3)
    assert weight_at_step(lambda step: torch.tensor(0.25), 0) == 0.25  # a 0-d tensor is a number


# ----------------------------------------------------------------------------- projector_dim


@pytest.mark.parametrize("dim", [0, -5, 2.5, True, None])
def test_projector_dim_must_be_a_positive_int(parts, dim):
    model, enc, _ = parts
    with pytest.raises(ConfigError, match=rf"projector_dim must be a positive int \(REPA: 2048\), got {dim!r}"):
        REPARegularizer(model, layers="blocks.1", encoders=enc, projector_dim=dim)
    with pytest.raises(ConfigError, match=r"projector_dim must be a positive int"):
        build_projector("mlp", 8, 8, projector_dim=dim)


# ----------------------------------------------------------------------------- empty batches


def test_empty_image_batch_raises_shape_mismatch(parts):
    model, enc, x = parts
    reg = REPARegularizer(model, layers="blocks.1", encoders=enc, projector_dim=16)
    empty = x[:0]  # (0, 3, 16, 16)
    _forward(model, empty)
    with pytest.raises(ShapeMismatchError, match=r"images has shape \(0, 3, 16, 16\): an empty batch"):
        reg(empty)
    _forward(model, empty)
    with pytest.raises(ShapeMismatchError, match=r"empty batch"):
        reg((empty * 255).to(torch.uint8))


def test_empty_feature_batch_raises_shape_mismatch(parts):
    model, enc, x = parts
    reg = REPARegularizer(model, layers="blocks.1", encoders=24, projector_dim=16)
    _forward(model, x[:0])
    with pytest.raises(ShapeMismatchError, match=r"targets of encoder 'encoder0' has shape \(0, 16, 24\)"):
        reg(features=torch.zeros(0, 16, 24))
