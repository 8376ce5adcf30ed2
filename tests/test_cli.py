import json

import pytest
from click.testing import CliRunner

from quikft.cli import main


def test_help_lists_every_command():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in ("quantize", "recover", "eval", "generate", "info"):
        assert command in result.output


def test_every_product_command_is_built():
    for command in ("quantize", "recover", "eval", "report", "generate", "info"):
        result = CliRunner().invoke(main, [command, "--help"])
        assert result.exit_code == 0 and "not built" not in result.output, command


def test_eval_prints_ppl_and_writes_json(tiny_dir, text_file, tmp_path):
    out = tmp_path / "res.json"
    args = ["eval", "--model", str(tiny_dir), "--ppl", str(text_file), "--seqlen", "32",
            "--max-windows", "3", "--json", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    entry = report["ppl"][0]
    assert entry["windows"] == 3 and entry["seqlen"] == 32 and entry["ppl"] > 1
    assert report["compute_dtype"]["dtype"] == report["dtype"] and "cpu capability" in report["compute_dtype"]["reason"]
    assert report["kernels"] == {}  # a plain (unpacked) model has no quantized layers
    assert "torch" in entry["versions"]
    assert f"ppl {entry['ppl']:.4f}" in result.output
    again = CliRunner().invoke(main, args)
    assert json.loads(out.read_text())["ppl"][0]["ppl"] == entry["ppl"], again.output


def test_eval_bad_dataset_is_one_line_error(tiny_dir):
    result = CliRunner().invoke(main, ["eval", "--model", str(tiny_dir), "--ppl", "nope.txt"])
    assert result.exit_code == 1
    assert "Error: --ppl 'nope.txt' is neither a known dataset (alpaca, " in result.output
    assert result.output.count("\n") == 1


def test_generate_runs_on_a_plain_model(tiny_dir):
    result = CliRunner().invoke(main, ["generate", "--model", str(tiny_dir), "--raw", "--max-new-tokens", "5",
                                       "The quick"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() != ""


def test_atomic_outputs_get_normal_permissions(tmp_path):
    import os

    from quikft.atomic import atomic_directory, write_json

    with atomic_directory(tmp_path / "out") as staging:
        write_json(staging / "r.json", {"a": 1})
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~mask
    assert (tmp_path / "out" / "r.json").stat().st_mode & 0o777 == 0o666 & ~mask


def test_eval_auto_dtype_follows_the_cpu(tiny_dir, text_file, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    out = tmp_path / "res.json"
    args = ["eval", "--model", str(tiny_dir), "--ppl", str(text_file), "--seqlen", "32", "--max-windows", "1",
            "--json", str(out)]
    assert CliRunner().invoke(main, args).exit_code == 0
    report = json.loads(out.read_text())
    assert report["dtype"] == "float32" and "AVX2" in report["compute_dtype"]["reason"] and report["device"] == "cpu"


def test_an_error_about_a_huge_value_stays_short_and_quick(tmp_path):
    """A YAML preset's aliases build values whose full repr is gigabytes; the one-line error shows a bounded
    repr, built in bounded time."""
    import time

    lines = ['_x0: &x0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"_x{i}: &x{i} [{', '.join([f'*x{i - 1}'] * 9)}]" for i in range(1, 9)]
    preset = tmp_path / "bomb.yaml"
    preset.write_text("\n".join(lines) + "\n")
    from quikft.config import ConfigError, QuantConfig, load_yaml

    value = load_yaml(preset)["_x8"]  # 9^9 * 9 strings if expanded
    began = time.perf_counter()
    with pytest.raises(ConfigError, match="setting bits must be") as err:
        QuantConfig(bits=value)
    assert len(str(err.value)) < 1024 and "\n" not in str(err.value)
    assert time.perf_counter() - began < 1


@pytest.mark.parametrize("args,message", [
    (["--temperature", "nan"], "--temperature must be a finite number >= 0"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be positive"),
    (["--device", "cuda"], "no CUDA device"),
])
def test_generate_refuses_bad_settings_in_one_line_before_loading(args, message, monkeypatch):
    import torch

    import quikft.models

    monkeypatch.setattr(quikft.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = CliRunner().invoke(main, ["generate", "Hello", *args])
    assert result.exit_code != 0 and message in result.output and result.output.count("\n") == 1


def test_generate_refuses_an_empty_prompt(monkeypatch):
    import quikft.models

    monkeypatch.setattr(quikft.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    result = CliRunner().invoke(main, ["generate", "  "])
    assert result.exit_code != 0 and "the prompt is empty" in result.output
