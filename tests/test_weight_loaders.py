"""Weight loaders: shards of merged stubs, tensor-parallel slices, packing and groups."""

import pytest
import torch

from qpass.layers.linear import QuantLinear
from qpass.layers.quantize_base import UnquantizedLinearMethod
from qpass.methods.awq import AWQConfig, pack_awq, unpack_awq
from qpass.methods.gptq import GPTQConfig
from qpass.methods.int8 import Int8Config
from qpass.passes.load import checkpoint_tensors_from_float, load_float_shard, load_shard
from models import relative_error


def full_stub(method, sizes=(256, 128, 128), k=512, bias=True):
    return QuantLinear(k, list(sizes), bias, torch.float32, method, shard_names=["q", "k", "v"][: len(sizes)])


def dense(stub, x):
    stub.finalise()
    return stub(x)


def test_awq_pack_order_round_trips_and_matches_autoawq_nibbles():
    q = torch.randint(0, 16, (4, 16), dtype=torch.int32)
    packed = pack_awq(q)
    assert torch.equal(unpack_awq(packed), q)
    # AutoAWQ puts column 2 of each block of eight in nibble 1 and column 1 in nibble 4.
    one = torch.zeros(1, 8, dtype=torch.int32)
    one[0, 2] = 5
    assert packed.dtype == torch.int32 and pack_awq(one).item() == 5 << 4
    one[0, 2], one[0, 1] = 0, 3
    assert pack_awq(one).item() == 3 << 16


@pytest.mark.parametrize("config", [AWQConfig(group_size=64), Int8Config()], ids=["awq", "int8"])
@pytest.mark.parametrize("parallel", ["column", "row"])
@pytest.mark.parametrize("tp_size", [2, 4])
def test_tensor_parallel_ranks_add_up_to_the_whole(config, parallel, tp_size):
    torch.manual_seed(0)
    k, sizes = 512, [256, 128, 128]
    weights = [torch.randn(n, k) for n in sizes]
    biases = [torch.randn(n) for n in sizes]
    x = torch.randn(3, k)
    whole = full_stub(config.get_linear_method(), sizes, k)
    for shard, (w, b) in enumerate(zip(weights, biases)):
        load_float_shard(whole, shard, w, b)
    expected = dense(whole, x)
    outs = []
    for rank in range(tp_size):
        stub = QuantLinear(k, sizes, True, torch.float32, config.get_linear_method(), shard_names=["q", "k", "v"],
                           parallel=parallel, tp_rank=rank, tp_size=tp_size)
        for shard, (w, b) in enumerate(zip(weights, biases)):
            load_float_shard(stub, ["q", "k", "v"][shard], w, b)
        x_rank = x.chunk(tp_size, dim=-1)[rank] if parallel == "row" else x
        outs.append(dense(stub, x_rank))
    if parallel == "row":
        got = sum(outs)  # what the all-reduce would do
    else:  # each rank holds its slice of q, k and v
        per_rank = [o.split([s // tp_size for s in sizes], dim=-1) for o in outs]
        got = torch.cat([torch.cat([p[i] for p in per_rank], dim=-1) for i in range(3)], dim=-1)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert relative_error(got, torch.cat([x @ w.t() + b for w, b in zip(weights, biases)], -1)) < 0.1


def test_row_parallel_rejects_a_slice_that_splits_a_group():
    with pytest.raises(ValueError, match="input size per partition 96 is not a multiple of group_size 64"):
        QuantLinear(384, [256], False, torch.float32, AWQConfig(group_size=64).get_linear_method(),
                    parallel="row", tp_rank=0, tp_size=4)


def test_gptq_row_parallel_needs_desc_act_off():
    with pytest.raises(ValueError, match=r"desc_act \(act-order, the default\) weights cannot be split along the "
                                         r"inputs \(row parallel: 128 of 512\); quantize with desc_act=False"):
        QuantLinear(512, [256], False, torch.float32, GPTQConfig().get_linear_method(),
                    parallel="row", tp_rank=0, tp_size=4)
    stub = QuantLinear(512, [256], False, torch.float32, GPTQConfig(desc_act=False).get_linear_method(),
                       parallel="row", tp_rank=1, tp_size=4)
    assert stub.qweight.shape == (128 // 8, 256)


def test_shard_shape_mismatch_names_parameter_and_shard():
    stub = full_stub(Int8Config().get_linear_method())
    with pytest.raises(ValueError, match=r"parameter 'qweight' shard 'k': checkpoint tensor has shape \(256, 512\), expected \(128, 512\)"):
        load_shard(stub, "k", checkpoint_tensors_from_float(stub, torch.randn(256, 512)), None)


def test_unknown_shard_name():
    stub = full_stub(Int8Config().get_linear_method())
    with pytest.raises(KeyError, match=r"no shard 'o'; shards are \['q', 'k', 'v'\]"):
        load_float_shard(stub, "o", torch.randn(256, 512), None)


def test_wrong_dtype_for_packed_tensor():
    stub = full_stub(AWQConfig().get_linear_method(), sizes=(256,), bias=False)
    with pytest.raises(TypeError, match="dtype torch.float32, expected torch.int32"):
        stub.qweight.weight_loader(stub.qweight, torch.zeros(512, 32))


def test_unquantized_method_loads_and_applies_like_linear():
    stub = full_stub(UnquantizedLinearMethod(), sizes=(64, 32), k=128)
    w = [torch.randn(64, 128), torch.randn(32, 128)]
    b = [torch.randn(64), torch.randn(32)]
    for shard in range(2):
        load_float_shard(stub, shard, w[shard], b[shard])
    x = torch.randn(2, 128)
    torch.testing.assert_close(dense(stub, x), x @ torch.cat(w).t() + torch.cat(b))


def test_use_before_finalise_is_an_error():
    stub = full_stub(Int8Config().get_linear_method())
    with pytest.raises(RuntimeError, match="before process_weights_after_loading"):
        stub(torch.randn(1, 512))
