"""qpass.save / qpass.load: bit-exact round trips, peer conventions in config.json, float
checkpoints, tensor-parallel ranks, and checkpoints that must be refused."""

import importlib
import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import qpass
from qpass.io import CheckpointError, load, save
from qpass.layers.linear import QuantLinear
from qpass.methods.base import method_names
from models import MLP, FunctionalLinears, TinyLM, seeded

IDS = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))


def on_meta(model_cls, *args):
    with torch.device("meta"):
        return model_cls(*args)


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def activations(model):
    return {name: m.activation for name, m in model.named_modules() if isinstance(m, QuantLinear)}


@pytest.fixture(scope="module")
def tiny():
    model = seeded(TinyLM)
    mixed = qpass.quantize(model, "awq", group_size=64, skip=["lm_head"], overrides={"*.down_proj": {"method": "int8"}})
    return model, mixed


def test_mixed_methods_round_trip_bit_exact_into_a_meta_model(tiny, tmp_path):
    _, qmodel = tiny
    save(qmodel, tmp_path, max_shard_size="200KB")
    meta = on_meta(TinyLM)
    loaded = load(meta, tmp_path)
    assert_same_state(qmodel, loaded)
    assert torch.equal(loaded(IDS), qmodel(IDS))
    assert activations(loaded) == activations(qmodel) and "silu_mul" in activations(loaded).values()  # lowered too
    assert loaded.lm_head.weight is loaded.embed.weight  # tied again
    assert all(p.device.type == "meta" for p in meta.parameters())  # the caller's model is untouched
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert all((tmp_path / f).exists() for f in index["weight_map"].values())


def test_config_follows_autoawq_and_tensors_are_per_original_linear(tiny, tmp_path):
    _, qmodel = tiny
    save(qmodel, tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert {k: qc[k] for k in ("quant_method", "bits", "group_size", "zero_point", "version")} == \
        {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True, "version": "gemm"}
    assert qc["modules_to_not_convert"] == ["lm_head"]
    assert qc["qpass"]["layers"]["layers.0.mlp.down_proj"] == {"method": "int8"}
    tensors = load_file(tmp_path / "model.safetensors")
    # q/k/v were one merged stub: saved as three AutoAWQ GEMM sets, qweight [K, N/8]
    assert tensors["layers.0.attn.q_proj.qweight"].shape == (256, 256 // 8)
    assert tensors["layers.0.attn.k_proj.qweight"].shape == (256, 128 // 8)
    assert tensors["layers.0.attn.v_proj.qzeros"].shape == (256 // 64, 128 // 8)
    assert tensors["layers.0.mlp.up_proj.scales"].shape == (256 // 64, 512)
    assert tensors["layers.0.mlp.down_proj.qweight"].dtype == torch.int8
    assert "lm_head.weight" not in tensors and "embed.weight" in tensors  # tied: saved once
    assert not any("q_proj_k_proj" in k for k in tensors)


def test_split_shards_equal_separately_quantized_linears(tiny, tmp_path):
    """A merged stub's split tensors are what each linear quantized on its own gives."""
    model, qmodel = tiny
    save(qmodel, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    alone = qpass.quantize(model, "awq", group_size=64, skip=["lm_head"], merge=False,
                           overrides={"*.down_proj": {"method": "int8"}})
    for key, value in alone.layers[1].attn.k_proj.state_dict().items():
        assert torch.equal(tensors[f"layers.1.attn.k_proj.{key}"], value), key


def test_int8_headline_and_module_tree_model(tmp_path):
    model = seeded(TinyLM)
    qmodel = qpass.quantize(model, "int8", merge=False, skip=["lm_head"])
    save(qmodel, tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "qpass" and qc["method"] == "int8"
    loaded = load(on_meta(TinyLM), tmp_path, merge=False)
    assert isinstance(loaded, TinyLM) and isinstance(loaded.layers[0].attn.q_proj, QuantLinear)
    assert_same_state(qmodel, loaded)
    assert torch.equal(loaded(IDS), qmodel(IDS))


def test_functional_linears_and_bias(tmp_path):
    model = seeded(FunctionalLinears)
    qmodel = qpass.quantize(model, "awq", group_size=64)
    save(qmodel, tmp_path)
    loaded = load(on_meta(FunctionalLinears), tmp_path)
    x = torch.randn(3, 256)
    assert torch.equal(loaded(x), qmodel(x))


def test_float_checkpoint_is_quantized_while_loading(tmp_path):
    model = seeded(TinyLM)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied, as HF saves it
    save_file(state, str(tmp_path / "model.safetensors"))
    loaded = load(on_meta(TinyLM), tmp_path, method="awq", group_size=64, skip=["lm_head"])
    expected = qpass.quantize(model, "awq", group_size=64, skip=["lm_head"])
    assert_same_state(expected, loaded)
    assert torch.equal(loaded(IDS), expected(IDS))
    with pytest.raises(CheckpointError, match="no quantization_config.*pass method="):
        load(on_meta(TinyLM), tmp_path)


def test_loading_into_a_real_model_copies_none_of_its_weights(tiny, tmp_path, monkeypatch):
    model, mixed = tiny
    save(mixed, tmp_path)
    load_module = importlib.import_module("qpass.io.load")  # qpass.io.load is also the function's name
    build_skeleton = load_module.skeleton
    devices_before_loading = set()

    def skeleton(*args, **kwargs):
        new = build_skeleton(*args, **kwargs)
        outside_stubs = [m for m in new.modules() if not isinstance(m, QuantLinear)]
        devices_before_loading.update(p.device.type for m in outside_stubs for p in m.parameters(recurse=False))
        return new

    monkeypatch.setattr(load_module, "skeleton", skeleton)
    loaded = load(model, tmp_path)  # the float model itself, not a meta one
    assert devices_before_loading == {"meta"}  # the skeleton copied none of the float weights
    assert_same_state(mixed, loaded)
    assert all(p.device.type == "cpu" for p in model.parameters())  # the caller's model is untouched


def test_hf_style_config_fields_are_kept(tmp_path):
    class Config:
        def to_dict(self):
            return {"model_type": "tiny", "hidden_size": 256}

    model = seeded(MLP)
    model.config = Config()
    qmodel = qpass.quantize(model, "int8", merge=False)
    save(qmodel, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == "tiny" and written["hidden_size"] == 256
    assert written["quantization_config"]["method"] == "int8"


def test_tensor_parallel_ranks_load_their_slices(tmp_path):
    model = seeded(MLP)
    qmodel = qpass.quantize(model, "awq", group_size=64)
    save(qmodel, tmp_path)
    x = torch.randn(4, 256)
    plan = {"fc1": "column", "fc2": "row"}
    ranks = [load(on_meta(MLP), tmp_path, tp_rank=r, tp_size=2, tp_plan=plan) for r in range(2)]
    assert ranks[0].fc1.output_partition_sizes == [256] and ranks[1].fc2.input_size_per_partition == 256
    total = sum(rank(x) for rank in ranks)  # column then row: gelu is per element, sum = all-reduce
    torch.testing.assert_close(total, qmodel(x), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif("gptq" not in method_names(), reason="the gptq method is not there yet")
def test_gptq_round_trip_and_config(tmp_path):
    model = seeded(TinyLM, 512, 256, 1)
    qmodel = qpass.quantize(model, "gptq", group_size=64, desc_act=True, skip=["lm_head"], calib=[IDS])
    save(qmodel, tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert {k: qc[k] for k in ("quant_method", "bits", "group_size", "desc_act", "sym")} == \
        {"quant_method": "gptq", "bits": 4, "group_size": 64, "desc_act": True, "sym": True}
    tensors = load_file(tmp_path / "model.safetensors")
    assert tensors["layers.0.attn.k_proj.qweight"].shape == (256 // 8, 128)  # GPTQ: [K/8, N]
    assert torch.equal(tensors["layers.0.attn.k_proj.g_idx"], tensors["layers.0.attn.q_proj.g_idx"])  # same input
    loaded = load(on_meta(TinyLM, 512, 256, 1), tmp_path)
    assert_same_state(qmodel, loaded)
    assert torch.equal(loaded(IDS), qmodel(IDS))


def test_calibrated_awq_round_trip(tmp_path):
    """AWQ's GPTQ rounding hands the swap checkpoint tensors: they save and load like rounded ones."""
    model = seeded(TinyLM, 512, 256, 1)
    qmodel = qpass.quantize(model, "awq", group_size=64, skip=["lm_head"], calib=[IDS])
    save(qmodel, tmp_path)
    loaded = load(on_meta(TinyLM, 512, 256, 1), tmp_path)
    assert_same_state(qmodel, loaded)
    assert torch.equal(loaded(IDS), qmodel(IDS))


# ---- checkpoints that must be refused, naming the file and the tensor ----


@pytest.fixture
def saved(tmp_path):
    model = seeded(MLP)
    save(qpass.quantize(model, "awq", group_size=64), tmp_path)
    return tmp_path


def rewrite(folder, change):
    file = folder / "model.safetensors"
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def refused(folder, match):
    meta = on_meta(MLP)
    with pytest.raises(CheckpointError, match=match):
        load(meta, folder)
    assert all(p.device.type == "meta" for p in meta.parameters())


def test_missing_tensor(saved):
    rewrite(saved, lambda t: t.pop("fc2.qzeros"))
    refused(saved, r"model.safetensors.*no tensor 'fc2.qzeros'")


def test_unexpected_tensor(saved):
    rewrite(saved, lambda t: t.update({"fc3.qweight": torch.zeros(2, dtype=torch.int32)}))
    refused(saved, r"model.safetensors: unexpected tensor 'fc3.qweight'")


def test_wrong_shape(saved):
    rewrite(saved, lambda t: t.update({"fc1.scales": torch.zeros(2, 512)}))
    refused(saved, r"model.safetensors: tensor 'fc1.scales'.*shape \(2, 512\), expected \(4, 512\)")


def test_wrong_dtype(saved):
    rewrite(saved, lambda t: t.update({"fc1.qweight": t["fc1.qweight"].float()}))
    refused(saved, r"model.safetensors: tensor 'fc1.qweight' has dtype torch.float32, expected torch.int32")


def test_config_that_contradicts_the_tensors(saved):
    config = json.loads((saved / "config.json").read_text())
    config["quantization_config"]["qpass"]["layers"]["fc1"]["group_size"] = 128
    (saved / "config.json").write_text(json.dumps(config))
    refused(saved, r"model.safetensors: tensor 'fc1.qzeros'.*shape \(4, 64\), expected \(2, 64\)")
    del config["quantization_config"]["qpass"]  # a plain AutoAWQ config: shapes tell
    config["quantization_config"]["group_size"] = 128
    (saved / "config.json").write_text(json.dumps(config))
    refused(saved, r"model.safetensors: tensor 'fc1.qzeros'.*shape \(4, 64\), expected \(2, 64\)")


def test_truncated_file(saved):
    file = saved / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    refused(saved, r"model.safetensors: not a readable safetensors file")


def test_corrupt_header(saved):
    file = saved / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[8:12] = b"!!!!"
    file.write_bytes(bytes(data))
    refused(saved, r"model.safetensors: not a readable safetensors file")


def test_index_naming_a_path_outside_the_folder(saved):
    (saved / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"fc1.qweight": "../x.safetensors"}}))
    refused(saved, r"index.json: '../x.safetensors' is not a safetensors file name in the folder")


def test_bad_json_config(saved):
    (saved / "config.json").write_text("{not json")
    refused(saved, r"config.json: not readable JSON")


def test_a_failed_save_keeps_the_previous_checkpoint(saved):
    before = (saved / "model.safetensors").read_bytes()
    model = qpass.quantize(seeded(MLP), "awq", group_size=64)
    model.fc1.quant_method.checkpoint_tensors = lambda layer: {"bogus": torch.zeros(1)}
    with pytest.raises(ValueError, match="stub 'fc1'.*'bogus'.*checkpoint_tensors"):
        save(model, saved)
    assert (saved / "model.safetensors").read_bytes() == before
    assert not list(saved.glob("*.tmp"))


# ---- fuzz: a corrupted file is refused with CheckpointError, or loads; never anything else ----


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pristine")
    save(qpass.quantize(seeded(MLP, 64, 64), "int8", merge=False), folder)
    return folder


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_corrupted_checkpoints(pristine, tmp_path_factory, data):
    raw = (pristine / "model.safetensors").read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    kind = data.draw(st.sampled_from(["truncate", "flip_header", "flip_any", "header_len"]))
    if kind == "truncate":
        corrupted = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif kind == "header_len":
        corrupted = struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1))) + raw[8:]
    else:
        end = 8 + header_len if kind == "flip_header" else len(raw)
        corrupted = bytearray(raw)
        for _ in range(data.draw(st.integers(1, 4))):
            corrupted[data.draw(st.integers(0, end - 1))] = data.draw(st.integers(0, 255))
        corrupted = bytes(corrupted)
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "config.json").write_bytes((pristine / "config.json").read_bytes())
    (folder / "model.safetensors").write_bytes(corrupted)
    meta = on_meta(MLP, 64, 64)
    try:
        loaded = load(meta, folder, merge=False)
    except CheckpointError as err:
        assert str(folder) in str(err)
    else:
        assert all(p.device.type != "meta" for p in loaded.parameters())
    assert all(p.device.type == "meta" for p in meta.parameters())
