import json
import math

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from quikft import arch
from quikft.arch import UnsupportedArchitectureError
from quikft.cli import main
from quikft.config import QuantConfig, QuantizeJob, build_config
from quikft.data import calibration_windows
from quikft.quant.blocks import capture_block_inputs
from quikft.quant.gptq import gptq_quantize, rtn_quantize
from quikft.quant.grid import round_to_fp16
from quikft.quant.model import quantize_model
from quikft.quant.saliency import column_scores, resolve_metric, select_salient
from quikft.quant.scheme import QuantScheme
from quikft.quant.statistics import find_input_groups, streaming_statistics

LLAMA_LAYERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def decoder_blocks(model):
    return arch.layout(model).blocks


def _calib(tokenizer, text_file, n=8, seqlen=48):
    return calibration_windows(tokenizer, str(text_file), nsamples=n, seqlen=seqlen, seed=0)


def _layer_inputs(model, calib, block_index, name):
    """All calibration inputs of one linear layer (tokens, in), with the FP model."""
    captured = []
    linear = decoder_blocks(model)[block_index].get_submodule(name)
    handle = linear.register_forward_hook(lambda m, a, o: captured.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=calib, use_cache=False)
    handle.remove()
    return torch.cat(captured)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_beats_rtn_on_real_tiny_layers(tiny, text_file, bits):
    model, tokenizer = tiny
    calib = _calib(tokenizer, text_file)
    for name in ("self_attn.q_proj", "mlp.down_proj"):
        x = _layer_inputs(model, calib, 1, name)
        linear = decoder_blocks(model)[1].get_submodule(name)
        w = linear.weight.data.float()
        h = 2 * x.T @ x / x.shape[0]
        salient = torch.tensor([1, 5, 9], dtype=torch.long)
        g = gptq_quantize(w, h, salient, QuantScheme(bits, group_size=32))
        r = rtn_quantize(w, salient, QuantScheme(bits, group_size=32))
        gptq_err = torch.linalg.norm(x @ w.T - x @ g.weight.T).item()
        rtn_err = torch.linalg.norm(x @ w.T - x @ r.weight.T).item()
        assert gptq_err < rtn_err, (name, bits)


def test_pipeline_quantizes_every_linear_and_keeps_salient_fp16(tiny, text_file):
    model, tokenizer = tiny
    original = {n: m.weight.data.clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    config = QuantConfig(bits=3, salient=8, group_size=32, nsamples=8, seqlen=48)
    out = quantize_model(model, _calib(tokenizer, text_file), config, progress=False)
    names = [f"model.layers.{i}.{n}" for i in range(2) for n in LLAMA_LAYERS]
    assert sorted(out.results) == sorted(names)
    for name in names:
        result = out.results[name]
        weight = model.get_submodule(name).weight.data
        assert torch.equal(weight, result.weight)
        assert result.salient.numel() == 8 and torch.all(result.salient[1:] > result.salient[:-1])
        sal = weight[:, result.salient]
        assert torch.equal(sal, round_to_fp16(sal))
        # they absorbed GPTQ's error feedback, so they moved away from the originals
        assert not torch.allclose(sal, round_to_fp16(original[name][:, result.salient]))
        base = result.dequantized_base()
        assert torch.all(base[:, result.salient] == 0)
    assert model.get_submodule("lm_head").weight.data.equal(original["lm_head"])
    assert len(out.layers) == len(names) and all(math.isfinite(layer.loss) for layer in out.layers)


def test_salient_columns_come_from_the_metric_on_block_inputs(tiny, text_file):
    model, tokenizer = tiny
    calib = _calib(tokenizer, text_file)
    config = QuantConfig(bits=3, salient=8, group_size=32, nsamples=8, seqlen=48)
    # expected: scores from the first block's FP inputs (block 0 sees the same inputs in both runs)
    layout = arch.layout(model)
    inputs = capture_block_inputs(model, layout, calib, 8, "cpu")
    block = layout.blocks[0]
    layers = {"mlp.up_proj": block.mlp.up_proj}
    with streaming_statistics(block, layers, find_input_groups(block, layers, inputs, 0)) as stats:
        block(inputs.batches[0], *inputs.calls[0][8].args, **inputs.calls[0][8].kwargs)
    w = block.mlp.up_proj.weight.data.float().clone()
    expected = select_salient(column_scores(w, stats["mlp.up_proj"].columns, resolve_metric("gift"), 3), 8)
    out = quantize_model(model, calib, config, progress=False)
    assert torch.equal(out.results["model.layers.0.mlp.up_proj"].salient, expected)


def test_fixed_salient_sets_are_respected(tiny, text_file):
    model, tokenizer = tiny
    fixed = {"model.layers.0.mlp.down_proj": torch.tensor([0, 3, 7])}
    config = QuantConfig(bits=4, salient=8, group_size=-1, nsamples=8, seqlen=48)
    out = quantize_model(model, _calib(tokenizer, text_file), config, progress=False, salient=fixed)
    assert out.results["model.layers.0.mlp.down_proj"].salient.tolist() == [0, 3, 7]


def test_same_seed_gives_identical_output(tiny_dir, text_file, tmp_path):
    from quikft.jobs.quantize import quantize

    reports = []
    for run in ("a", "b"):
        scheme = QuantConfig(bits=3, salient=4, group_size=32, calib=str(text_file), nsamples=6, seqlen=40)
        job = QuantizeJob(scheme, model=str(tiny_dir), out=str(tmp_path / run), eval_windows=0)
        reports.append(quantize(job, progress=False))
    from conftest import read_weights

    a, b = read_weights(tmp_path / "a"), read_weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [x["loss"] for x in reports[0]["layers"]] == [x["loss"] for x in reports[1]["layers"]]


def test_salient_count_is_capped_with_a_warning(tiny, text_file):
    model, tokenizer = tiny
    config = QuantConfig(bits=4, salient=500, group_size=-1, nsamples=4, seqlen=32)
    with pytest.warns(UserWarning, match="capped at 63"):
        out = quantize_model(model, _calib(tokenizer, text_file, 4, 32), config, progress=False)
    assert out.results["model.layers.0.self_attn.q_proj"].salient.numel() == 63


def test_a_model_without_decoder_blocks_is_refused_in_one_line():
    from torch import nn

    class NoBlocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)

    with pytest.raises(UnsupportedArchitectureError, match="cannot find the decoder blocks of NoBlocks"):
        arch.check_supported(NoBlocks())


@pytest.mark.parametrize("field,value,message", [
    ("bits", 5, "bits"), ("group_size", 0, "group size 0 is invalid"), ("group_size", -4, "group size -4"),
    ("method", "awq", "unknown method"),
])
def test_bad_settings_are_refused(field, value, message):
    with pytest.raises(ValueError, match=message):
        QuantConfig(**{field: value})


def test_yaml_preset_with_cli_override(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("bits: 4\nsalient: 32\ngroup-size: -1\n")
    config = build_config(QuantConfig, preset, salient=16)
    assert (config.bits, config.salient, config.group_size) == (4, 16, -1)
    preset.write_text("bitz: 4\n")
    with pytest.raises(ValueError, match="unknown setting"):
        build_config(QuantConfig, preset)


def test_cli_quantize_writes_run_and_refuses_bad_input(tiny_dir, text_file, tmp_path):
    out = tmp_path / "run"
    base = ["quantize", "--model", str(tiny_dir), "--calib", str(text_file), "--nsamples", "4", "--seqlen", "32",
            "--salient", "4", "--group-size", "32", "--eval-windows", "0"]
    bad = CliRunner().invoke(main, [*base, "--bits", "5", "--out", str(out)])
    assert bad.exit_code == 1 and "bits must be one of" in bad.output and bad.output.count("\n") == 1
    assert not out.exists()
    ok = CliRunner().invoke(main, [*base, "--bits", "3", "--out", str(out)])
    assert ok.exit_code == 0, ok.output
    report = json.loads((out / "quantize_report.json").read_text())
    assert report["config"]["bits"] == 3 and report["peak_rss_mb"] > 0 and len(report["layers"]) == 14
    assert report["format"] == "packed"
    assert report["compute_dtype"]["dtype"] == "float32" and "cpu capability" in report["compute_dtype"]["reason"]
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "quikft"
    indices = load_file(out / "salient_indices.safetensors")
    assert len(indices) == 14 and all(t.dtype == torch.int32 and t.numel() == 4 for t in indices.values())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial directories left
