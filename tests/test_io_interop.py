"""Interop with a real peer, compressed-tensors (llm-compressor's checkpoint library, what
vLLM serves), on the CPU: its pack-quantized 4-bit group-wise checkpoints load in qpass
with the peer's outputs, and qpass's read back in the peer the same way.

A test-only dependency: pip install compressed-tensors==0.20.0
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import qpass
from qpass.io import load, save
from models import MLP, TinyLM, seeded

ct = pytest.importorskip("compressed_tensors", reason="pip install compressed-tensors (test-only)")
from compressed_tensors.compressors import ModelCompressor  # noqa: E402
from compressed_tensors.quantization import (  # noqa: E402
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    apply_quantization_config,
)
from compressed_tensors.quantization.utils import calculate_qparams  # noqa: E402

GROUP = 64


def on_meta(model_cls, *args):
    with torch.device("meta"):
        return model_cls(*args)


def peer_config(ignore=()):
    args = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=GROUP)
    return QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
                              ignore=list(ignore))


def peer_writes(model, folder, ignore=()):
    """What llm-compressor does: attach the scheme, set min-max scales and zero points,
    compress to pack-quantized, save the state dict and the config."""
    config = peer_config(ignore)
    apply_quantization_config(model, config)
    args = config.config_groups["group_0"].weights
    for module in model.modules():
        if hasattr(module, "weight_zero_point"):
            w = module.weight.data
            groups = w.reshape(w.shape[0], -1, GROUP)
            scale, zero = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
            module.weight_scale.data.copy_(scale)
            module.weight_zero_point.data.copy_(zero)
    compressor = ModelCompressor.from_pretrained_model(model, "pack-quantized")
    compressor.compress_model(model)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    compressor.update_config(str(folder))
    return model  # compressed: its forward decompresses, as the peer runs it


def peer_reads(model, folder, tied=()):
    """What transformers' compressed-tensors loader does: scheme from config.json,
    compressed parameters, the checkpoint's tensors (tied weights saved once), then
    decompress."""
    qconfig = json.loads((folder / "config.json").read_text())["quantization_config"]
    config = QuantizationConfig.model_validate(qconfig)
    apply_quantization_config(model, config)
    compressor = ModelCompressor(quantization_config=config)
    compressor.compress_model(model)
    missing, unexpected = model.load_state_dict(load_file(folder / "model.safetensors"), strict=False)
    assert not unexpected and missing == list(tied), (missing, unexpected)
    compressor.decompress_model(model)
    return model


def test_peer_checkpoint_loads_with_the_peers_outputs_and_saves_back_bit_exact(tmp_path):
    peer_dir, back_dir = tmp_path / "peer", tmp_path / "back"
    peer_dir.mkdir()
    peer = peer_writes(seeded(MLP), peer_dir)
    loaded = load(on_meta(MLP), peer_dir)
    x = torch.randn(5, 256)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), peer(x), rtol=1e-5, atol=1e-5)
    save(loaded, back_dir, format="compressed-tensors")
    theirs, ours = load_file(peer_dir / "model.safetensors"), load_file(back_dir / "model.safetensors")
    assert theirs.keys() == ours.keys()
    for key in theirs:
        assert theirs[key].dtype == ours[key].dtype and torch.equal(theirs[key], ours[key]), key


def test_qpass_checkpoint_reads_back_in_the_peer(tmp_path):
    model = seeded(TinyLM, 512, 256, 1)
    qmodel = qpass.quantize(model, "awq", group_size=GROUP, skip=["lm_head"])
    save(qmodel, tmp_path, format="compressed-tensors")
    qconfig = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qconfig["ignore"] == ["lm_head"] and qconfig["format"] == "pack-quantized"
    fresh = seeded(TinyLM, 512, 256, 1, seed=1)  # other weights: all must come from the file
    fresh.lm_head.weight = fresh.embed.weight
    with torch.no_grad():
        peer = peer_reads(fresh, tmp_path, tied=["lm_head.weight"])
        ids = torch.randint(0, 512, (2, 10))
        torch.testing.assert_close(peer(ids), qmodel(ids), rtol=1e-4, atol=1e-4)
    reloaded = load(on_meta(TinyLM, 512, 256, 1), tmp_path)  # and qpass reads its own
    assert torch.equal(reloaded(ids), qmodel(ids))


@pytest.mark.slow
def test_real_model_saved_and_loaded_into_a_meta_model(tmp_path):
    """all-MiniLM-L6-v2 (a transformers BertModel, module tree): quantized, saved, loaded
    into a model built on meta (buffers real), identical embeddings."""
    assets = pytest.importorskip("assets", reason="examples/assets.py")
    accelerate = pytest.importorskip("accelerate")
    from transformers import AutoModel

    model, tokenizer = assets.load_minilm()
    qmodel = qpass.quantize(model, "awq", overrides={"*.output.dense": {"method": "int8"}})
    save(qmodel, tmp_path, max_shard_size="8MB")
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == "bert" and written["quantization_config"]["quant_method"] == "awq"
    with accelerate.init_empty_weights(include_buffers=False):
        meta = AutoModel.from_config(model.config)
    loaded = load(meta.eval(), tmp_path)
    sentences = ["A checkpoint saved by one tool.", "Loaded by another, it gives the same numbers."]
    with torch.no_grad():
        assert torch.equal(assets.embed(loaded, tokenizer, sentences), assets.embed(qmodel, tokenizer, sentences))
