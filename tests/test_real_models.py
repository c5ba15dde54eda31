"""qpass.quantize on real pretrained models and real text (../shared/ASSETS.md): the
accuracy bars of the core issue, round-to-nearest (calibration has its own tests)."""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

import qpass
from qpass.layers.linear import QuantLinear

pytestmark = pytest.mark.slow


def test_from_the_repository_root_kernels_is_the_distribution_transformers_imports():
    """transformers (5.25 on) imports Hugging Face's ``kernels`` distribution. From the repository's root, where
    qpass's kernels/ folder is importable under that name too, ``import kernels`` must still give the distribution
    (kernels/__init__.py hands the name over)."""
    root = Path(__file__).resolve().parent.parent
    try:
        installed = Path(importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py")).resolve()
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the kernels distribution is not installed (transformers before 5.25)")
    script = "import kernels, transformers.integrations.hub_kernels; print(kernels.__file__)"
    run = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert Path(run.stdout.strip()).resolve() == installed


@pytest.mark.parametrize("method, bar", [("awq", 0.94), ("int8", 0.999)])
def test_minilm_embeddings_keep_their_direction(assets, minilm, method, bar):
    model, tokenizer, texts, reference = minilm
    qmodel = qpass.quantize(model, method)
    assert type(qmodel) is type(model)  # a Hugging Face model keeps its class
    assert sum(isinstance(m, QuantLinear) for m in qmodel.modules()) == 36 + 1  # 37 linears, pooler's included
    mean, worst = assets.mean_cosine(assets.embed(qmodel, tokenizer, texts), reference)
    print(f"all-MiniLM-L6-v2 {method}: mean cosine {mean:.4f}, min {worst:.4f} over {len(texts)} sentences")
    assert mean >= bar


def test_smollm2_int8_perplexity(assets, smollm2):
    model, _, windows, base = smollm2
    qmodel = qpass.quantize(model, "int8", skip=["lm_head"])
    assert qmodel.lm_head.weight is qmodel.model.embed_tokens.weight
    ppl = assets.perplexity(qmodel, windows)
    print(f"SmolLM2-135M int8: perplexity {ppl:.3f} vs float {base:.3f} ({100 * (ppl / base - 1):+.2f}%)")
    assert ppl <= base * 1.01


def test_smollm2_awq_perplexity(smollm2, smollm2_awq_rtn_perplexity):
    model, _, _, base = smollm2
    qmodel = qpass.quantize(model, "awq", skip=["lm_head"])
    assert qmodel.lm_head.weight is qmodel.model.embed_tokens.weight
    # 576 inputs: groups of 64; 1536 inputs: groups of 128
    assert qmodel.model.layers[0].self_attn.q_proj.quant_method.quant_config.group_size == 64
    assert qmodel.model.layers[0].mlp.down_proj.quant_method.quant_config.group_size == 128
    ppl = smollm2_awq_rtn_perplexity  # the same quantization, evaluated once for this and calibration's tests
    print(f"SmolLM2-135M awq: perplexity {ppl:.3f} vs float {base:.3f} ({100 * (ppl / base - 1):+.2f}%)")
    assert ppl <= base * 1.40


def test_smollm2_backend_folds_every_norm_and_residual(smollm2):
    """Hugging Face's Llama code through Dynamo and the qpass rewrite: each layer's two RMSNorms
    go into the stubs that read them and its two residual adds into o_proj's and down_proj's
    epilogues, and the logits are those of ``qpass.quantize``'s module tree (nothing folded)."""
    import torch
    from test_backend import capture

    model, _, windows, _ = smollm2
    ids = windows[:2, :96]
    graphs = []
    with torch.no_grad():
        compiled = torch.compile(model, backend=capture(graphs, skip=["lm_head"]))
        logits = compiled(ids, use_cache=False).logits
        reference = qpass.quantize(model, "awq", skip=["lm_head"])(ids, use_cache=False).logits
    stubs = [n for gm in graphs for n in gm.graph.nodes if n.op == "call_module"
             and isinstance(gm.get_submodule(n.target), QuantLinear)]
    layers = model.config.num_hidden_layers
    assert sum("norm_weight" in n.kwargs for n in stubs) == 2 * layers  # merged q/k/v, merged gate/up
    assert sum("residual" in n.kwargs for n in stubs) == 2 * layers
    torch._dynamo.reset()
    error = ((logits - reference).norm() / reference.norm()).item()
    print(f"SmolLM2-135M awq, folded against unfolded: relative error {error:.2e}")
    assert error < 1e-4


def test_smollm2_quantized_module_tree_is_lowered_by_the_backend(smollm2):
    """``qpass.quantize`` keeps a Hugging Face model's module tree; compiled with the qpass
    backend, its stubs inlined into op calls, each layer's two RMSNorms go into the five ops
    that read them (q, k, v, gate, up) and its two residual adds into o_proj's and down_proj's;
    nothing is quantized again (lm_head, skipped, stays float), and the logits are the eager
    model's."""
    import torch
    from qpass.passes.lower import OpCall, quantized_linear
    from test_backend import capture

    model, _, windows, _ = smollm2
    qmodel = qpass.quantize(model, "awq", skip=["lm_head"])
    ids = windows[:2, :96]
    graphs = []
    with torch.no_grad():
        logits = torch.compile(qmodel, backend=capture(graphs))(ids, use_cache=False).logits
        reference = qmodel(ids, use_cache=False).logits
    torch._dynamo.reset()
    ops = [op for gm in graphs for node in gm.graph.nodes if isinstance(op := quantized_linear(gm, node), OpCall)]
    layers = model.config.num_hidden_layers
    assert len(ops) == 7 * layers and not any(n.op == "call_module" for gm in graphs for n in gm.graph.nodes)
    assert sum(op.arguments["norm_weight"] is not None for op in ops) == 5 * layers
    assert sum(isinstance(op.arguments["bias"], torch.fx.Node) and op.arguments["bias"].op != "get_attr"
               for op in ops) == 2 * layers
    assert ((logits - reference).norm() / reference.norm()).item() < 1e-5


def greedy_without_cache(model, ids, new_tokens: int):
    """Greedy decoding that recomputes the whole sequence at every step (no KV cache)."""
    import torch

    for _ in range(new_tokens):
        next_id = model(ids, use_cache=False).logits[:, -1:].argmax(-1)
        ids = torch.cat([ids, next_id], dim=1)
    return ids


@pytest.mark.parametrize("method", ["awq", "int8"])
def test_smollm2_generates_with_its_kv_cache(smollm2, method):
    """``generate`` as a user calls it: a prefill, then one token a step through the stubs with
    Hugging Face's KV cache. Its greedy tokens are those of recomputing the whole sequence at each
    step, so the one-row calls and the cache see the same layers as a full forward."""
    import torch

    model, tokenizer, _, _ = smollm2
    qmodel = qpass.quantize(model, method, skip=["lm_head"])
    ids = tokenizer("It is a truth universally acknowledged, that a single man in possession of a good fortune,",
                    return_tensors="pt").input_ids
    with torch.no_grad():
        generated = qmodel.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
        recomputed = greedy_without_cache(qmodel, ids, 24)
    print(f"SmolLM2-135M {method}: {tokenizer.decode(generated[0, ids.shape[1]:])!r}")
    assert generated.shape == (1, ids.shape[1] + 24)
    assert torch.equal(generated, recomputed)
