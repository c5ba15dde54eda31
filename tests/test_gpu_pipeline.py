"""The whole pipeline with the model on a GPU, as the demo runs it there: quantize with every
method (calibrated on CUDA batches, or on the GPU for a model left on the CPU), save and load
back onto the GPU, and torch.compile. The CPU tests cover the same behaviour on the CPU; these
are marked ``cuda`` and skip without one."""

import pytest
import torch

import qpass
from models import TinyLM, relative_error, seeded

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# Relative error of TinyLM's logits against the float model's (fp16/bf16 roundings included).
BOUND = {"int8": 0.03, "fp8": 0.05, "awq": 0.1, "gptq": 0.1}
CALIBRATED = ("awq", "gptq")


def token_batches(n=4, seed=0, device="cuda"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (2, 32), generator=g).to(device) for _ in range(n)]


def assert_on(model, device):
    where = {name: t.device.type for name, t in list(model.named_parameters()) + list(model.named_buffers())}
    assert set(where.values()) == {device}, where


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["int8", "fp8", "awq", "gptq"])
def test_gpu_quantize_a_model_on_the_gpu(method, dtype):
    model = seeded(TinyLM).to("cuda", dtype)
    calib = token_batches() if method in CALIBRATED else None
    q = qpass.quantize(model, method, calib=calib, skip=["lm_head"])
    assert_on(q, "cuda")
    ids = token_batches(1, seed=1)[0]
    with torch.no_grad():
        out, ref = q(ids), model(ids)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert relative_error(out, ref) < BOUND[method]


@pytest.mark.parametrize("method", CALIBRATED)
def test_gpu_calibration_of_a_model_left_on_the_cpu(method):
    """calib_device="cuda": the blocks go to the GPU one at a time, the quantized model stays
    on the CPU, and it is as close to the float model as one calibrated on the CPU."""
    model = seeded(TinyLM)
    on_gpu = qpass.quantize(model, method, calib=token_batches(device="cpu"), calib_device="cuda", skip=["lm_head"])
    on_cpu = qpass.quantize(model, method, calib=token_batches(device="cpu"), skip=["lm_head"])
    assert_on(on_gpu, "cpu")
    ids = token_batches(1, seed=1, device="cpu")[0]
    with torch.no_grad():
        ref = model(ids)
        gpu_error, cpu_error = relative_error(on_gpu(ids), ref), relative_error(on_cpu(ids), ref)
    assert gpu_error < BOUND[method] and gpu_error < 1.2 * cpu_error + 1e-3


@pytest.mark.parametrize("method", ["int8", "awq", "gptq"])
def test_gpu_save_and_load_onto_the_gpu(method, tmp_path):
    model = seeded(TinyLM).to("cuda", torch.float16)
    q = qpass.quantize(model, method, calib=token_batches() if method in CALIBRATED else None, skip=["lm_head"])
    qpass.save(q, tmp_path)
    with torch.device("meta"):
        skeleton = TinyLM().to(torch.float16)
    loaded = qpass.load(skeleton, tmp_path, device="cuda")
    assert_on(loaded, "cuda")
    saved, back = q.state_dict(), loaded.state_dict()
    assert saved.keys() == back.keys()
    assert all(saved[k].dtype == back[k].dtype and torch.equal(saved[k], back[k]) for k in saved)
    ids = token_batches(1, seed=2)[0]
    with torch.no_grad():  # split K adds float32 partial sums in whichever order they arrive
        assert relative_error(loaded(ids), q(ids)) < 1e-3


@pytest.mark.parametrize("method", ["int8", "awq"])
def test_gpu_quantized_model_compiles_without_graph_break(method):
    model = seeded(TinyLM).to("cuda", torch.bfloat16)
    q = qpass.quantize(model, method, skip=["lm_head"])
    compiled = torch.compile(q, fullgraph=True)
    for tokens in (1, 7):  # a decode step and a short prefill
        ids = token_batches(1, seed=tokens)[0][:1, :tokens]
        with torch.no_grad():  # Inductor fuses the float ops around the quantized ones: bf16 roundings move
            assert relative_error(compiled(ids), q(ids)) < 1e-2
