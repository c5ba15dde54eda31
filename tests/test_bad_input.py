"""Bad input: an error that names the layer and what is wrong, and the model as it was."""

import copy

import pytest
import torch
from torch import nn

import qpass
from models import MLP, TinyLM, seeded


def assert_unchanged(model, snapshot):
    assert [type(m) for m in model.modules()] == [type(m) for m in snapshot.modules()]
    for (name, a), (_, b) in zip(model.state_dict().items(), snapshot.state_dict().items()):
        assert torch.equal(a, b) or (a.isnan().any() and torch.equal(a.isnan(), b.isnan())), name


def check(model, error, match, inplace=True, **kwargs):
    snapshot = copy.deepcopy(model)
    with pytest.raises(error, match=match):
        qpass.quantize(model, inplace=inplace, **kwargs)
    assert_unchanged(model, snapshot)


def test_unknown_method_lists_known_ones():
    check(seeded(MLP), ValueError, r"unknown quantization method 'awk'; known methods: .*awq.*int8", method="awk")


def test_unknown_option_lists_valid_ones():
    check(seeded(MLP), ValueError, r"method 'awq' has no option 'group'; its options are: bits, group_size, rounding, zero_point",
          method="awq", group=64)


def test_option_of_wrong_type():
    check(seeded(MLP), TypeError, r"option 'group_size' of method 'awq' must be int, got str '64'",
          method="awq", group_size="64")
    check(seeded(MLP), TypeError, r"must be int, got bool", method="awq", group_size=True)


def test_option_value_out_of_range():
    check(seeded(MLP), ValueError, r"awq group_size must be a multiple of 8 and >= 32, got 12", method="awq", group_size=12)
    check(seeded(MLP), ValueError, r"awq supports bits=4 only, got bits=3", method="awq", bits=3)
    check(seeded(MLP), ValueError, r"awq rounding must be one of \(.gptq., .nearest.\), got .round.", method="awq",
          rounding="round")
    check(seeded(MLP), ValueError, r"gptq token_norm_cap must be 0 \(off\) or >= 1 .*, got 0.5", method="gptq",
          token_norm_cap=0.5)


def test_bad_override():
    check(seeded(MLP), ValueError, r"unknown quantization method 'nope'", method="awq",
          overrides={"fc2": {"method": "nope"}})


def test_unsupported_dtype_names_the_layer():
    model = seeded(MLP).double()
    check(model, TypeError, r"linear 'fc1': weight dtype torch.float64 is not supported", method="int8")


def test_meta_device_names_the_layer():
    with torch.device("meta"):
        model = MLP()
    with pytest.raises(ValueError, match=r"linear 'fc1': weight is on the meta device"):
        qpass.quantize(model, "awq", inplace=True)
    assert isinstance(model.fc1, nn.Linear)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_name_the_layer(bad):
    model = seeded(TinyLM, layers=2)
    with torch.no_grad():
        model.layers[1].mlp.up_proj.weight[3, 7] = bad
    check(model, ValueError, r"linear 'layers.1.mlp.up_proj': weight \(512, 256\) has 1 NaN/Inf values", method="awq")
    check(model, ValueError, r"layers.1.mlp.up_proj", method="awq", inplace=False)


def test_not_a_module():
    with pytest.raises(TypeError, match="quantize takes an nn.Module, got dict"):
        qpass.quantize({}, "awq")


def test_model_without_linears():
    with pytest.raises(ValueError, match="Sequential has no nn.Linear"):
        qpass.quantize(nn.Sequential(nn.ReLU()), "awq")
