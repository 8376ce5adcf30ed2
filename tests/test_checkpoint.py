"""Packed checkpoints: save/load round trips, from_pretrained, strict errors, `quikft info`."""

import copy
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import quikft
from quikft import checkpoint
from quikft.checkpoint import CheckpointError, load, save_packed
from quikft.cli import main
from quikft.config import QuantConfig
from quikft.data import calibration_windows
from quikft.format import writer
from quikft.models import load_model
from quikft.nn import QuikLinear, nonsalient_columns
from quikft.packing import pack_codes, unpack_codes, unpack_zeros
from quikft.quant.model import quantize_model


def _quantize(model, tokenizer, corpus, dtype_rest="fp32", **settings):
    """Quantize the tiny model; unquantized tensors stay float32 unless asked, so loads compare exactly."""
    config = QuantConfig(salient=8, nsamples=4, seqlen=32, clip_search=False, dtype_rest=dtype_rest, **settings)
    calib = calibration_windows(tokenizer, str(corpus), nsamples=4, seqlen=32, seed=0)
    return config, quantize_model(model, calib, config, progress=False), calib


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _from_pretrained(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


@pytest.mark.parametrize("bits,group_size,act_order,shard", [
    (3, 32, True, None), (2, 32, False, None), (4, 32, True, "60KB"), (3, -1, True, None), (4, -1, False, None),
])
def test_round_trip_reproduces_the_fake_quant_model(tiny, text_file, tmp_path, bits, group_size, act_order, shard, exact_kernels):
    model, tokenizer = tiny
    config, quantized, calib = _quantize(model, tokenizer, text_file, bits=bits, group_size=group_size,
                                         act_order=act_order)
    fake = copy.deepcopy(model)
    out = save_packed(model, tokenizer, quantized, tmp_path / "packed", config,
                      **({"max_shard_size": shard} if shard else {}))
    # saving neither changes nor copies into the model
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fake.state_dict().values(), strict=True))
    assert (out / "model.safetensors.index.json").exists() == bool(shard)
    loaded = load(out, dtype=torch.float32)
    ids = calib[:2]
    assert torch.allclose(_logits(loaded, ids), _logits(fake, ids), atol=1e-4, rtol=0)
    hf = _from_pretrained(out)  # float32: the checkpoint's dtype_rest
    assert torch.allclose(_logits(hf, ids), _logits(loaded, ids), atol=1e-5, rtol=0)
    for name, result in quantized.results.items():
        for candidate in (loaded, hf):
            layer = candidate.get_submodule(name)
            assert isinstance(layer, QuikLinear) and layer.bits == bits
            # only the non-salient columns are stored, group-contiguous
            keep = nonsalient_columns(layer.in_features, result.salient)
            perm = layer.perm.long()
            assert torch.equal(perm.sort().values, keep)
            assert bool((layer.g_idx.diff() >= 0).all())
            assert layer.qweight.shape[0] == math.ceil((layer.in_features - layer.k) * bits / 32)
            assert torch.equal(unpack_codes(layer.qweight, bits, keep.numel()), result.codes[:, perm])
            assert torch.equal(unpack_zeros(layer.qzeros, bits, layer.out_features), result.zeros)
            assert torch.equal(layer.scales.float().t(), result.scales)
            assert torch.equal(layer.salient_idx.long(), result.salient)
            assert torch.equal(layer.g_idx, result.g_idx[perm])
            assert torch.equal(layer.dequantize_weight(), result.dequantized_base())
            assert torch.equal(layer.effective_weight(), result.weight)
    for candidate in (loaded, hf):
        assert candidate.lm_head.weight is candidate.model.embed_tokens.weight
        assert not candidate.training


def test_config_carries_method_settings_and_modules(tiny, text_file, tmp_path):
    model, tokenizer = tiny
    config, quantized, _ = _quantize(model, tokenizer, text_file, bits=3, group_size=32)
    save_packed(model, tokenizer, quantized, tmp_path / "p", config)
    qconfig = json.loads((tmp_path / "p" / "config.json").read_text())["quantization_config"]
    assert qconfig["quant_method"] == "quikft" and qconfig["format_version"] == 2 and qconfig["dtype_rest"] == "fp32"
    assert (qconfig["bits"], qconfig["group_size"], qconfig["salient"], qconfig["sym"]) == (3, 32, 8, False)
    assert (qconfig["metric"], qconfig["act_order"], qconfig["method"]) == ("gift", True, "gptq")
    assert qconfig["modules"] == list(quantized.results) and len(qconfig["modules"]) == 14
    assert qconfig["settings"] == config.to_dict()
    stored = load_file(tmp_path / "p" / "model.safetensors")
    assert "lm_head.weight" not in stored and "model.embed_tokens.weight" in stored  # tied: stored once
    assert "model.layers.0.self_attn.q_proj.weight" not in stored
    assert stored["model.layers.0.self_attn.q_proj.qweight"].dtype == torch.int32
    assert (tmp_path / "p" / "tokenizer.json").exists() and (tmp_path / "p" / "generation_config.json").exists()
    # a loaded model is itself serializable: save_pretrained writes the same packed tensors back
    resaved = tmp_path / "resaved"
    _from_pretrained(tmp_path / "p").save_pretrained(resaved)
    again = load_file(resaved / "model.safetensors")
    assert again.keys() == stored.keys() and all(torch.equal(again[k], stored[k]) for k in stored)
    assert json.loads((resaved / "config.json").read_text())["quantization_config"] == qconfig


@pytest.fixture(scope="module")
def packed_dir(tmp_path_factory, tiny_dir):
    """One packed checkpoint, copied by each test that damages it."""
    from conftest import TOKENIZER_CORPUS

    root = tmp_path_factory.mktemp("packed")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(TOKENIZER_CORPUS * 3) + "\n")
    model, tokenizer = load_model(str(tiny_dir))
    config, quantized, _ = _quantize(model, tokenizer, corpus, bits=3, group_size=32)
    return save_packed(model, tokenizer, quantized, root / "ckpt", config)


def _rewrite(path, change):
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _truncate(path):
    os.truncate(path, path.stat().st_size - 100)


def _set_format_version(path):
    config = json.loads(path.read_text())
    config["quantization_config"]["format_version"] = 99
    path.write_text(json.dumps(config))


DOWN = "model.layers.1.mlp.down_proj"
CORRUPTIONS = {
    "truncated": ("model.safetensors", _truncate, r"model\.safetensors: truncated safetensors file: tensor \S+"),
    "missing": ("model.safetensors", lambda p: _rewrite(p, lambda t: t.pop(f"{DOWN}.qzeros")),
                rf"model\.safetensors: tensor {DOWN}\.qzeros is missing"),
    "unexpected": ("model.safetensors", lambda p: _rewrite(p, lambda t: t.update(extra=torch.zeros(2))),
                   r"model\.safetensors: unexpected tensor extra"),
    "shape": ("model.safetensors",
              lambda p: _rewrite(p, lambda t: t.update({f"{DOWN}.qweight": t[f"{DOWN}.qweight"][:-1].clone()})),
              rf"model\.safetensors: tensor {DOWN}\.qweight has shape \[14, 64\], expected \[15, 64\]"),
    # g_idx must cover the 160 - 8 non-salient columns only, not every column
    "g_idx": ("model.safetensors",
              lambda p: _rewrite(p, lambda t: t.update({f"{DOWN}.g_idx": torch.zeros(160, dtype=torch.int32)})),
              rf"model\.safetensors: tensor {DOWN}\.g_idx has shape \[160\], expected \[152\]"),
    "salient_count": ("model.safetensors",
                      lambda p: _rewrite(p, lambda t: t.update({f"{DOWN}.salient_idx": torch.arange(161).int()})),
                      rf"model\.safetensors: tensor {DOWN}\.salient_idx has 161 entries, more than the layer's 160"),
    "dtype": ("model.safetensors",
              lambda p: _rewrite(p, lambda t: t.update({f"{DOWN}.scales": t[f"{DOWN}.scales"].float()})),
              rf"model\.safetensors: tensor {DOWN}\.scales has dtype torch\.float32, expected torch\.float16"),
    "version": ("config.json", _set_format_version, r"format_version 99 is not supported"),
}


@pytest.mark.parametrize("loader", ["quikft.load", "from_pretrained"])
@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_damaged_checkpoints_raise_one_line_errors(packed_dir, tmp_path, case, loader):
    target = shutil.copytree(packed_dir, tmp_path / "ckpt")
    filename, damage, message = CORRUPTIONS[case]
    damage(target / filename)
    with pytest.raises(CheckpointError, match=message) as err:
        load(target) if loader == "quikft.load" else _from_pretrained(target)
    assert "\n" not in str(err.value)
    if loader == "quikft.load":
        assert str(target / filename) in str(err.value)


def test_other_methods_and_bad_index_values_are_refused(packed_dir, tmp_path):
    target = shutil.copytree(packed_dir, tmp_path / "ckpt")
    _rewrite(target / "model.safetensors",
             lambda t: t.update({f"{DOWN}.g_idx": torch.full_like(t[f"{DOWN}.g_idx"], 99)}))
    with pytest.raises(CheckpointError, match=rf"tensor {DOWN}\.g_idx has values outside \[0, 5\)"):
        load(target)
    config = json.loads((target / "config.json").read_text())
    config["quantization_config"]["quant_method"] = "gptq"
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json: quantization_config\.quant_method is 'gptq'"):
        load(target)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "{outside}", "sub/model.safetensors", "fifo"])
def test_an_index_never_leads_outside_the_checkpoint(packed_dir, tmp_path, shard):
    """An index naming a path (or something that is not a regular file) is refused by the loaders that read
    it, in one line and before any tensor is read; the outside file is never opened."""
    import os

    from safetensors import safe_open

    target = shutil.copytree(packed_dir, tmp_path / "ckpt")
    outside = tmp_path / "outside.safetensors"
    shutil.copy(target / "model.safetensors", outside)
    os.mkfifo(target / "fifo")
    with safe_open(target / "model.safetensors", framework="pt") as handle:
        names = list(handle.keys())
    weight_map = {name: "model.safetensors" for name in names}
    weight_map[names[0]] = shard.format(outside=outside)
    (target / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    before = outside.stat().st_atime_ns
    for attempt in (lambda: load(target), lambda: checkpoint.describe(target)):
        with pytest.raises(CheckpointError, match="not a file name inside the checkpoint|not a regular file") as err:
            attempt()
        assert "\n" not in str(err.value) and len(str(err.value)) < 1024
    assert outside.stat().st_atime_ns == before
    result = CliRunner().invoke(main, ["info", str(target)])
    assert result.exit_code == 1 and result.output.count("\n") == 1


def test_failed_save_leaves_nothing_behind(tiny, text_file, tmp_path, monkeypatch):
    model, tokenizer = tiny
    config, quantized, _ = _quantize(model, tokenizer, text_file, bits=4, group_size=32)

    def explode(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(writer, "write_model_config", explode)  # after the shards are written
    with pytest.raises(RuntimeError, match="disk full"):
        save_packed(model, tokenizer, quantized, tmp_path / "runs" / "out", config)
    assert list((tmp_path / "runs").iterdir()) == []  # neither the target nor a partial staging directory


def test_info_reports_bits_compression_and_salient_fraction(packed_dir):
    result = CliRunner().invoke(main, ["info", str(packed_dir)])
    assert result.exit_code == 0, result.output
    assert "bits 3, salient k 8, group size 32" in result.output and "compression" in result.output
    assert "mlp.down_proj" in result.output and "12.5%" in result.output  # 8 of 64 columns
    summary = json.loads(CliRunner().invoke(main, ["info", "--json", str(packed_dir)]).output)
    assert summary["bits"] == 3 and len(summary["layers"]) == 14
    assert summary["compression_vs_fp16"] > 1 and summary["packed_vs_limit"] >= 1
    down = next(layer for layer in summary["layers"] if layer["name"] == DOWN)
    # 160 inputs - 8 salient = 152 quantized columns in 5 groups of (up to) 32
    assert (down["in_features"], down["out_features"], down["k"], down["n_groups"]) == (160, 64, 8, 5)
    assert down["limit_bytes"] == (64 * (3 * 152 + 16 * 8) + 5 * 64 * (16 + 3)) / 8
    # codes for the 152 quantized columns only: qweight, qzeros, scales, g_idx, perm, salient_idx, salient_weight
    assert down["packed_bytes"] == 4 * 15 * 64 + 4 * 5 * 6 + 2 * 5 * 64 + 2 * 4 * 152 + 4 * 8 + 2 * 64 * 8
    assert summary["format_version"] == 2 and "format 2" in result.output
    assert "kernels here" in result.output and "decode " in result.output and "prefill " in result.output
    # what info reports is what a load on this machine then runs (the same measured choice)
    layer = load(packed_dir).get_submodule(DOWN)
    assert (layer.kernel_name, layer.prefill_kernel_name) == (down["kernel"], down["prefill_kernel"])


def test_info_on_a_plain_model_is_a_one_line_error(tiny_dir):
    result = CliRunner().invoke(main, ["info", str(tiny_dir)])
    assert result.exit_code == 1 and "not a quikft packed checkpoint" in result.output
    assert result.output.count("\n") == 1


def test_eval_and_generate_accept_packed_directories(packed_dir, text_file):
    result = CliRunner().invoke(main, ["eval", "--model", str(packed_dir), "--ppl", str(text_file),
                                       "--seqlen", "32", "--max-windows", "2"])
    assert result.exit_code == 0, result.output
    assert "ppl" in result.output
    result = CliRunner().invoke(main, ["generate", "--model", str(packed_dir), "--raw", "--max-new-tokens", "3",
                                       "The quick"])
    assert result.exit_code == 0, result.output
    model, _ = load_model(str(packed_dir))
    assert isinstance(model.model.layers[0].mlp.up_proj, QuikLinear)


def test_quantize_cli_writes_packed_by_default_and_fake_quant_on_request(tiny_dir, text_file, tmp_path, exact_kernels):
    base = ["quantize", "--model", str(tiny_dir), "--calib", str(text_file), "--nsamples", "4", "--seqlen", "32",
            "--salient", "4", "--group-size", "32", "--bits", "4", "--no-clip-search", "--eval-windows", "0",
            "--dtype-rest", "fp32"]
    for flag, name in ((None, "packed"), ("--fake-quant", "fake")):
        result = CliRunner().invoke(main, [*base, "--out", str(tmp_path / name), *([flag] if flag else [])])
        assert result.exit_code == 0, result.output
    assert checkpoint.is_packed_checkpoint(tmp_path / "packed")
    assert json.loads((tmp_path / "packed" / "quantize_report.json").read_text())["format"] == "packed"
    assert not checkpoint.is_packed_checkpoint(tmp_path / "fake")
    assert json.loads((tmp_path / "fake" / "quantize_report.json").read_text())["format"] == "fake-quant"
    from conftest import read_weights

    assert "model.layers.0.mlp.up_proj.weight" in read_weights(tmp_path / "fake")
    packed, _ = load_model(str(tmp_path / "packed"))
    fake, _ = load_model(str(tmp_path / "fake"))
    ids = torch.arange(3, 40).unsqueeze(0)
    assert torch.allclose(_logits(packed, ids), _logits(fake, ids), atol=1e-4, rtol=0)


def test_import_is_lazy_and_registers_with_transformers(packed_dir):
    """`import quikft` does not import transformers' quantizers, yet from_pretrained finds ours."""
    script = (
        "import sys, quikft\n"
        "assert 'transformers.quantizers' not in sys.modules\n"
        "from transformers import AutoModelForCausalLM\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(packed_dir)!r})\n"
        "print(type(model.model.layers[0].self_attn.q_proj).__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "QuikLinear"


def test_public_api():
    assert quikft.load is load and quikft.save_packed is save_packed


def test_dequantized_cache_switch_covers_every_layer_and_keeps_outputs(packed_dir, exact_kernels):
    from quikft.nn import set_dequantized_cache

    model = load(packed_dir, dtype=torch.float32)
    ids = torch.randint(0, 300, (2, 12))  # short inputs: the uncached path dequantizes on every call
    plain = _logits(model, ids)
    modules = json.loads((packed_dir / "config.json").read_text())["quantization_config"]["modules"]
    assert set_dequantized_cache(model) == len(modules)
    torch.testing.assert_close(_logits(model, ids), plain, rtol=1e-5, atol=1e-5)
    assert all(m._cache is not None for m in model.modules() if isinstance(m, QuikLinear))


def _as_format_1(directory):
    """Rewrite a format-2 checkpoint as quikft 0.1 wrote it: ascending non-salient columns, no perm."""
    tensors = load_file(directory / "model.safetensors")
    for name in [key.removesuffix(".perm") for key in tensors if key.endswith(".perm")]:
        perm = tensors.pop(f"{name}.perm").long()
        ascending = torch.argsort(perm)  # stored position of each column, in column order
        bits = json.loads((directory / "config.json").read_text())["quantization_config"]["bits"]
        codes = unpack_codes(tensors[f"{name}.qweight"], bits, perm.numel())
        tensors[f"{name}.qweight"] = pack_codes(codes[:, ascending], bits)
        tensors[f"{name}.g_idx"] = tensors[f"{name}.g_idx"][ascending].contiguous()
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"]["format_version"] = 1
    del config["quantization_config"]["dtype_rest"]
    (directory / "config.json").write_text(json.dumps(config))


def test_format_1_checkpoints_load_and_convert(packed_dir, tmp_path):
    old = shutil.copytree(packed_dir, tmp_path / "v1")
    _as_format_1(old)
    ids = torch.randint(0, 300, (2, 12))
    expected = _logits(load(packed_dir, dtype=torch.float32), ids)
    v1 = load(old, dtype=torch.float32)
    assert v1.config.quantization_config["format_version"] == 2  # reordered in memory
    assert torch.equal(_logits(v1, ids), expected)
    assert torch.equal(_logits(_from_pretrained(old), ids), expected)
    assert "format 1" in CliRunner().invoke(main, ["info", str(old)]).output
    result = CliRunner().invoke(main, ["convert", str(old), "--out", str(tmp_path / "v2")])
    assert result.exit_code == 0, result.output
    converted, original = load_file(tmp_path / "v2" / "model.safetensors"), load_file(packed_dir / "model.safetensors")
    assert converted.keys() == original.keys() and all(torch.equal(converted[k], original[k]) for k in original)
    assert (tmp_path / "v2" / "tokenizer.json").exists()
    qconfig = json.loads((tmp_path / "v2" / "config.json").read_text())["quantization_config"]
    assert qconfig["format_version"] == 2
    # converting onto the input is refused before anything is written
    result = CliRunner().invoke(main, ["convert", str(old), "--out", str(old)])
    assert result.exit_code == 1 and "overlaps the input" in result.output


def test_convert_checks_its_output_like_every_job_and_copies_no_links(packed_dir, tmp_path, monkeypatch):
    from quikft.format import conversion

    old = shutil.copytree(packed_dir, tmp_path / "v1")
    _as_format_1(old)
    (tmp_path / "secret.txt").write_text("outside the checkpoint")
    (old / "notes.txt").symlink_to(tmp_path / "secret.txt")
    unrelated = tmp_path / "photos"
    unrelated.mkdir()
    (unrelated / "cat.jpg").write_bytes(b"cat")
    monkeypatch.setattr(conversion, "load", lambda *a, **k: pytest.fail("loaded before checking --out"))
    result = CliRunner().invoke(main, ["convert", str(old), "--out", str(unrelated)])
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert "is not a previous output of this command" in result.output and "--overwrite" not in result.output
    monkeypatch.undo()
    assert CliRunner().invoke(main, ["convert", str(old), "--out", str(tmp_path / "v2")]).exit_code == 0
    assert not (tmp_path / "v2" / "notes.txt").exists()  # a link out of the checkpoint is not carried
    again = CliRunner().invoke(main, ["convert", str(old), "--out", str(tmp_path / "v2")])
    assert again.exit_code == 1 and "pass --overwrite to replace it" in again.output
    assert CliRunner().invoke(main, ["convert", str(old), "--out", str(tmp_path / "v2"), "--overwrite"]).exit_code == 0
    assert (unrelated / "cat.jpg").read_bytes() == b"cat"


def test_unquantized_tensors_are_saved_in_bf16_by_default(tiny, text_file, tmp_path):
    model, tokenizer = tiny
    config, quantized, calib = _quantize(model, tokenizer, text_file, dtype_rest="bf16", bits=3, group_size=32)
    out = save_packed(model, tokenizer, quantized, tmp_path / "p", config)
    stored = load_file(out / "model.safetensors")
    assert stored["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert stored["model.norm.weight"].dtype == torch.bfloat16
    assert stored["model.layers.0.mlp.up_proj.scales"].dtype == torch.float16  # packed tensors as they are
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = load(out, dtype=torch.float32)
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight.bfloat16().float())


def test_default_load_prepares_the_measured_kernels(packed_dir):
    from quikft.hardware import compute_dtype
    from quikft.nn import autotune

    native = compute_dtype("cpu").dtype == torch.bfloat16
    model = load(packed_dir)  # dtype auto: bf16 where native, else float32
    layers = [m for m in model.modules() if isinstance(m, QuikLinear)]
    assert model.dtype == (torch.bfloat16 if native else torch.float32)
    for layer in layers:  # the measured choice among the kernels the policy allows
        allowed = {k.name for k in autotune.candidates(layer.layout(), torch.device("cpu"), model.dtype)}
        assert {layer.kernel_name, layer.prefill_kernel_name} <= allowed
    reference = load(packed_dir, dtype=torch.float32, kernel="torch")
    ids = torch.randint(0, 300, (2, 12))
    fast, exact = _logits(model, ids).float(), _logits(reference, ids)
    assert float((fast - exact).norm() / exact.norm()) < 2e-2  # bf16 or int8 activations at most
    # whatever holds the codes, the state dict is still the checkpoint format, bit for bit
    stored = load_file(packed_dir / "model.safetensors")
    state = model.state_dict()
    quik = [key for key in stored if key.rpartition(".")[2] in checkpoint.QUIK_TENSORS]
    assert all(torch.equal(state[key], stored[key]) for key in quik)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(packed_dir)
    assert [m.kernel_name for m in hf.modules() if isinstance(m, QuikLinear)] == [m.kernel_name for m in layers]
    assert torch.equal(_logits(hf, ids), _logits(model, ids))


def test_from_pretrained_loads_float32_where_bf16_is_not_native(tiny, text_file, tmp_path, monkeypatch):
    import quikft.hf
    from quikft.hardware import DtypeChoice

    model, tokenizer = tiny
    config, quantized, _ = _quantize(model, tokenizer, text_file, dtype_rest="bf16", bits=3, group_size=32)
    out = save_packed(model, tokenizer, quantized, tmp_path / "p", config)
    monkeypatch.setattr(quikft.hf, "compute_dtype", lambda device: DtypeChoice(torch.float32, "cpu capability AVX2"))
    with pytest.warns(UserWarning, match="loading in float32, not bfloat16 .cpu capability AVX2"):
        hf = _from_pretrained(out)
    assert hf.dtype == torch.float32
    assert all(m.kernel_name is not None for m in hf.modules() if isinstance(m, QuikLinear))


@pytest.mark.parametrize("key,value,named", [
    ("salient", -1, "salient -1"), ("salient", "many", "salient 'many'"), ("dtype_rest", "int3", "dtype_rest 'int3'"),
    ("format_version", True, "format_version True"), ("sym", "no", "sym 'no'"), ("bits", 5, "bits 5"),
    ("group_size", 0, "group_size 0"),
])
def test_declared_settings_are_checked_where_they_are_read(packed_dir, tmp_path, key, value, named):
    """A crafted quantization_config cannot pass one type for another (``sym: "no"`` as true, ``true`` as
    format 1) or print an unchecked value: every loader and info refuse it in one line."""
    target = shutil.copytree(packed_dir, tmp_path / "ckpt")
    config = json.loads((target / "config.json").read_text())
    config["quantization_config"][key] = value
    (target / "config.json").write_text(json.dumps(config))
    for attempt in (lambda: load(target), lambda: checkpoint.describe(target)):
        with pytest.raises(CheckpointError, match=re.escape(named)):
            attempt()
    result = CliRunner().invoke(main, ["info", str(target)])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and named in result.output


def test_a_header_nested_too_deep_is_a_corrupt_header(packed_dir, tmp_path):
    import struct

    target = shutil.copytree(packed_dir, tmp_path / "ckpt")
    header = b"[" * 100_000 + b"]" * 100_000
    (target / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        load(target)
