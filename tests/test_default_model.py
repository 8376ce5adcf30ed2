"""Slow checks on the embedded default model (SmolLM2-135M); CI runs them too."""

import math

import pytest
import torch

from quikft import arch
from quikft.data import calibration_windows
from quikft.eval import evaluate_ppl
from quikft.models import load_model
from quikft.quant.blocks import capture_block_inputs, run_block
from quikft.quant.gptq import gptq_quantize, rtn_quantize
from quikft.quant.saliency import column_scores, resolve_metric, select_salient
from quikft.quant.scheme import QuantScheme
from quikft.quant.statistics import find_input_groups, streaming_statistics

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_model(shared_data):
    return load_model()


def test_default_model_ppl_on_first_window(default_model):
    model, tokenizer = default_model
    result = evaluate_ppl(model, tokenizer, "wikitext2", seqlen=2048, max_windows=1, progress=False)
    assert result.total_windows == 148
    assert math.isfinite(result.ppl) and 5 < result.ppl < 40


@pytest.mark.parametrize("bits", [3, 2])
def test_gptq_beats_rtn_on_default_model_layers(default_model, bits):
    model, tokenizer = default_model
    calib = calibration_windows(tokenizer, "c4", nsamples=8, seqlen=256, seed=0)
    layout = arch.layout(model)
    inputs = capture_block_inputs(model, layout, calib, batch_size=8, device="cpu")
    block = layout.blocks[0]
    captured = {}

    def keep_input(name):
        def hook(module, args, output):  # returns None: a forward hook's return value replaces the output
            captured[name] = args[0].reshape(-1, args[0].shape[-1])
        return hook

    hooks = [block.get_submodule(n).register_forward_hook(keep_input(n)) for n in ("self_attn.q_proj", "mlp.down_proj")]
    layers = {name: block.get_submodule(name) for name in ("self_attn.q_proj", "mlp.down_proj")}
    with streaming_statistics(block, layers, find_input_groups(block, layers, inputs, 0)) as stats:
        run_block(block, inputs, 0)
    for hook in hooks:
        hook.remove()
    for name, x in captured.items():
        w = block.get_submodule(name).weight.data.float()
        salient = select_salient(column_scores(w, stats[name].columns, resolve_metric("gift"), bits), 128)
        gptq = gptq_quantize(w, stats[name].hessian.hessian(), salient, QuantScheme(bits, group_size=128))
        rtn = rtn_quantize(w, salient, QuantScheme(bits, group_size=128))
        no_salient = gptq_quantize(w, stats[name].hessian.hessian(), torch.empty(0, dtype=torch.long),
                                   QuantScheme(bits))
        error = {key: torch.linalg.norm(x @ w.T - x @ r.weight.T).item()
                 for key, r in (("gptq", gptq), ("rtn", rtn), ("gptq_k0", no_salient))}
        assert error["gptq"] < error["rtn"], (name, error)
        assert error["gptq"] < error["gptq_k0"], (name, error)


def test_packed_checkpoint_of_real_blocks_matches_fake_quant(default_model, tmp_path, monkeypatch):
    """Two real blocks of the default model at 3 bits, k=128: packed == fake-quant, both load paths agree."""
    import copy

    import transformers

    import quikft
    from quikft.checkpoint import save_packed
    from quikft.config import QuantConfig
    from quikft.nn import QuikLinear
    from quikft.quant.model import quantize_model

    model, tokenizer = default_model
    small = copy.deepcopy(model)
    small.model.layers = small.model.layers[:2]
    small.config.num_hidden_layers = 2
    config = QuantConfig(bits=3, salient=128, nsamples=8, seqlen=128, dtype_rest="fp32")
    calib = calibration_windows(tokenizer, "c4", config.nsamples, config.seqlen, seed=0)
    quantized = quantize_model(small, calib, config, progress=False)
    save_packed(small, tokenizer, quantized, tmp_path / "packed", config)

    ids = calib[:2, :96]
    with torch.no_grad():
        fake = small(input_ids=ids).logits
        loaded = quikft.load(tmp_path / "packed", dtype=torch.float32, kernel="torch")
        packed = loaded(input_ids=ids).logits
        with monkeypatch.context() as env:
            env.setenv("QUIKFT_KERNEL", "torch")
            hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "packed", dtype=torch.float32)
        via_hf = hf(input_ids=ids).logits
        # the int4 operator on real layers, in bf16 and in an fp32 model's bf16 island: 576x576 ... 576x1536,
        # k = 128; and the measured choice of an fp32 model (ONNX Runtime's int8 activations where it won)
        fast = quikft.load(tmp_path / "packed", dtype=torch.bfloat16, kernel="cpu-int4")
        fast_logits = fast(input_ids=ids).logits.float()
        island_logits = quikft.load(tmp_path / "packed", dtype=torch.float32, kernel="cpu-int4")(input_ids=ids).logits
        measured_logits = quikft.load(tmp_path / "packed", dtype=torch.float32)(input_ids=ids).logits
    assert isinstance(loaded.model.layers[1].mlp.down_proj, QuikLinear)
    assert isinstance(hf.model.layers[0].self_attn.q_proj, QuikLinear)
    assert (packed - fake).abs().max().item() <= 1e-4
    assert (via_hf - packed).abs().max().item() <= 1e-5
    assert {m.kernel_name for m in fast.modules() if isinstance(m, QuikLinear)} == {"cpu-int4"}
    for logits in (fast_logits, island_logits, measured_logits):
        assert ((logits - fake).norm() / fake.norm()).item() < 2e-2
