"""``salient`` as a count or a fraction of each layer's input columns: parsing (Python, YAML, CLI),
the per-layer resolution, one-line errors before any work, and the checkpoint's declared value."""

import pytest
from click.testing import CliRunner

import quikft.jobs.quantize
import quikft.recovery
from quikft.checkpoint import CheckpointError, validate_quantization_config
from quikft.cli import main
from quikft.config import (
    ConfigError,
    QuantConfig,
    QuantizeJob,
    build_config,
    resolve_salient,
    salient_text,
)
from quikft.recovery import RecoverConfig


@pytest.mark.parametrize(("given", "stored"), [(128, 128), (0, 0), ("128", 128), (0.03, 0.03), ("0.03", 0.03),
                                               ("3%", 0.03), (" 12.5% ", 0.125)])
def test_a_count_stays_a_count_and_a_fraction_a_fraction(given, stored):
    salient = QuantConfig(salient=given).salient
    assert salient == stored and type(salient) is type(stored)
    assert RecoverConfig(salient=given).salient == stored and RecoverConfig().salient is None
    assert QuantConfig().salient == 128  # the default is unchanged


def test_a_fraction_resolves_per_layer_to_the_nearest_count_capped_like_a_count():
    assert [resolve_salient(0.03, width) for width in (576, 1536)] == [17, 46]  # 17.28, 46.08
    assert resolve_salient(0.29, 100) == 29  # 0.29 * 100 is 28.999999999999996: floor would give 28
    assert resolve_salient(0.05, 64) == 3 and resolve_salient(0.05, 160) == 8
    assert resolve_salient(0.9999, 64) == 63 and resolve_salient(500, 160) == 159  # one column stays quantized
    assert resolve_salient(128, 576) == 128 and resolve_salient(0.001, 64) == 0
    assert salient_text(0.03) == "3%" and salient_text(128) == "128"


BAD = ["-1", "100%", "150%", "abc", "1.5", "0%", "nan", "3%%"]


@pytest.mark.parametrize("value", [*BAD, -1, 1.5, 1.0, True, [3]])
def test_bad_values_are_one_line_errors_naming_the_setting_and_the_fix(value):
    with pytest.raises(ConfigError) as err:
        QuantConfig(salient=value)
    message = str(err.value)
    assert err.value.setting == "salient" and "\n" not in message
    assert message.startswith("salient ") and "such as 0.03 or 3%" in message


def test_yaml_presets_take_counts_and_fractions_and_name_the_preset_of_a_bad_one(tmp_path):
    preset = tmp_path / "q.yaml"
    for text, expected in [("salient: 3%", 0.03), ("salient: 0.03", 0.03), ("salient: 64", 64)]:
        preset.write_text(text + "\n")
        assert build_config(QuantConfig, preset).salient == expected
    assert build_config(QuantConfig, preset, salient="5%").salient == 0.05  # a flag overrides the preset
    preset.write_text("salient: 150%\n")
    with pytest.raises(ConfigError, match=f"^{preset}: salient '150%' is neither"):
        build_config(QuantConfig, preset)


def test_cli_flags_take_a_fraction(monkeypatch, tmp_path):
    seen = []

    def stop(config, **_):  # the job as the CLI built it, then nothing runs
        seen.append(config)
        raise SystemExit(0)

    monkeypatch.setattr(quikft.jobs.quantize, "quantize", stop)
    monkeypatch.setattr(quikft.recovery, "recover", stop)
    CliRunner().invoke(main, ["quantize", "--salient", "3%", "--out", str(tmp_path / "o")])
    CliRunner().invoke(main, ["recover", "--mode", "pre", "--salient", "0.05", "--out", str(tmp_path / "r")])
    assert isinstance(seen[0], QuantizeJob) and seen[0].quant.salient == 0.03
    assert isinstance(seen[1], RecoverConfig) and seen[1].salient == 0.05


@pytest.mark.parametrize("command", ["quantize", "recover"])
@pytest.mark.parametrize("value", BAD[:4])
def test_cli_refuses_a_bad_salient_in_one_line_before_any_work(command, value, monkeypatch):
    monkeypatch.setattr(quikft.jobs.quantize, "quantize", lambda *a, **k: pytest.fail("the job ran"))
    monkeypatch.setattr(quikft.recovery, "recover", lambda *a, **k: pytest.fail("the job ran"))
    result = CliRunner().invoke(main, [command, "--salient", value])
    assert result.exit_code != 0 and result.output.count("\n") == 1
    assert "salient" in result.output and "neither a count" in result.output


def test_a_checkpoint_declares_a_count_or_a_float_fraction():
    qconfig = {"quant_method": "quikft", "format_version": 2, "bits": 3, "group_size": 128, "sym": False,
               "modules": ["model.layers.0.mlp.down_proj"]}
    for salient in (128, 0, 0.03):
        validate_quantization_config({**qconfig, "salient": salient}, "ckpt")
    for salient in ("3%", 1.5, -1, None, True):
        with pytest.raises(CheckpointError, match="quantization_config declares salient") as err:
            validate_quantization_config({**qconfig, "salient": salient}, "ckpt")
        assert "\n" not in str(err.value)
