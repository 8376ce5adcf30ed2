"""Every named choice has one source, a ``Choice`` enum: the CLI's choices and help, the registries that
implement the members, and the config's checks all come from it and cannot drift apart."""

import json
import typing

import click
import pytest
from click.testing import CliRunner

from quikft import cli
from quikft.config import (
    BpwError,
    Choice,
    ConfigError,
    OffloadMode,
    QuantConfig,
    QuantizeJob,
    QuantMethod,
    RestDtype,
    SaliencyMetric,
    setting_field,
)
from quikft.eval.lm_eval_backend import SCHEMA_OVERRIDES
from quikft.eval.results import EvalBackend
from quikft.eval.tasks import ALL_TASKS, TASKS, ZeroShotTask, parse_tasks
from quikft.format.layout import DTYPE_REST
from quikft.quant.budget import ERRORS
from quikft.quant.saliency import PRESETS, resolve_metric


def _options(command: click.Command) -> dict[str, click.Option]:
    return {param.name: param for param in command.params if isinstance(param, click.Option)}


def _choice_settings() -> dict[str, type[Choice]]:
    """Every quantize setting whose field is a Choice, by name."""
    found = {}
    for name in _options(cli.quantize):
        try:
            _, kind = setting_field(QuantizeJob, name)
        except KeyError:  # --config, not a setting
            continue
        if isinstance(kind, type) and issubclass(kind, Choice):
            found[name] = kind
    return found


def test_every_choice_setting_of_quantize_is_found():
    assert _choice_settings() == {"method": QuantMethod, "metric": SaliencyMetric, "dtype_rest": RestDtype,
                                  "bpw_error": BpwError, "offload_activations": OffloadMode}


@pytest.mark.parametrize("name,choice", sorted(_choice_settings().items()))
def test_the_cli_offers_exactly_the_members_and_shows_the_config_default(name, choice):
    option = _options(cli.quantize)[name]
    if isinstance(option.type, click.Choice):
        assert tuple(option.type.choices) == choice.names()
    else:  # checked by the config (one-line error); the help spells the names
        assert cli.spoken(choice.names()) in option.help
    field, _ = setting_field(QuantizeJob, name)
    assert isinstance(field.default, choice) and f"[{field.default}]" in option.help
    assert option.default is None  # a YAML preset's value stands unless the flag is given


def test_every_quantize_setting_with_a_default_shows_it():
    for name, option in _options(cli.quantize).items():
        if name in ("config_path", "trust_remote_code"):
            continue
        field, kind = setting_field(QuantizeJob, name)
        if kind in (int, float, str) or isinstance(kind, type) and issubclass(kind, Choice):
            assert f"[{field.default}]" in option.help, name


def test_the_eval_command_offers_every_backend_and_task():
    options = _options(cli.eval_command)
    assert tuple(options["backend"].type.choices) == EvalBackend.names()
    assert options["backend"].default == EvalBackend.NATIVE
    assert f"{', '.join(ZeroShotTask.names())} or {ALL_TASKS}" in options["tasks"].help


def test_every_member_has_its_implementation():
    assert set(PRESETS) | {SaliencyMetric.CUSTOM} == set(SaliencyMetric)
    assert set(ERRORS) == set(BpwError)
    assert set(DTYPE_REST) == set(RestDtype)
    assert set(TASKS) == set(ZeroShotTask) and all(name is spec.name for name, spec in TASKS.items())
    assert set(SCHEMA_OVERRIDES) <= set(ZeroShotTask)


def _click_choice_error(flag: str, names: tuple[str, ...]) -> str:
    return f"Error: Invalid value for '{flag}': 'nope' is not one of {', '.join(map(repr, names))}."


@pytest.mark.parametrize("args,message", [
    (["quantize", "--method", "nope"], _click_choice_error("--method", QuantMethod.names())),
    (["quantize", "--dtype-rest", "nope"], _click_choice_error("--dtype-rest", RestDtype.names())),
    (["quantize", "--bpw-error", "nope"], _click_choice_error("--bpw-error", BpwError.names())),
    (["quantize", "--offload-activations", "nope"], _click_choice_error("--offload-activations",
                                                                        OffloadMode.names())),
    (["eval", "--backend", "nope"], _click_choice_error("--backend", EvalBackend.names())),
    (["quantize", "--metric", "nope"],
     f"Error: unknown saliency metric 'nope'; use one of {', '.join(SaliencyMetric.names())}"),
    (["eval", "--tasks", "nope"], f"Error: unknown task 'nope'; use one or more of {', '.join(ZeroShotTask.names())} "
                                  f"or all (comma separated, task=PATH for a local file)"),
])
def test_an_unknown_name_is_a_one_line_error(args, message):
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code != 0
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert errors == [message], result.output


def test_settings_hold_members_and_report_plain_strings():
    job = QuantizeJob(quant=QuantConfig(method="rtn", metric="owq", dtype_rest="fp32", bpw_error="output"),
                      offload_activations="disk")
    assert job.quant.method is QuantMethod.RTN and job.quant.metric is SaliencyMetric.OWQ
    assert job.offload_activations is OffloadMode.DISK and job.quant.bpw_error is BpwError.OUTPUT
    flat = job.to_dict()
    for name in ("method", "metric", "dtype_rest", "bpw_error", "offload_activations"):
        assert type(flat[name]) is str, name  # reports, fingerprints and checkpoints never see the enums
    assert json.dumps(flat["method"]) == '"rtn"' and repr(flat["offload_activations"]) == "'disk'"


@pytest.mark.parametrize("value,message", [
    (5, "setting metric must be a string; got 5 (int)"),
    ("OWQ", "unknown saliency metric 'OWQ'; use one of gift, quik, owq, wanda, custom"),
])
def test_a_bad_choice_in_a_preset_keeps_its_message(value, message):
    with pytest.raises(ConfigError) as err:
        QuantConfig(metric=value)
    assert str(err.value) == message


def test_custom_metric_resolves_to_its_free_norms():
    assert resolve_metric(SaliencyMetric.CUSTOM, tau=None, rho=2, gamma=1) == resolve_metric(None, None, 2, 1)
    assert resolve_metric(SaliencyMetric.OWQ) == PRESETS[SaliencyMetric.OWQ]


def test_all_tasks_are_plain_names():
    assert [type(ref.name) for ref in parse_tasks(ALL_TASKS)] == [str] * len(ZeroShotTask)


def test_the_checkpoint_records_plain_names(tiny_dir, text_file, tmp_path, exact_kernels):
    """A tiny quantize: config.json's quantization_config spells each choice as the plain string it did
    before the enums (byte for byte: the same JSON text)."""
    out = tmp_path / "packed"
    args = ["quantize", "--model", str(tiny_dir), "--calib", str(text_file), "--nsamples", "4", "--seqlen", "32",
            "--salient", "4", "--group-size", "32", "--bits", "4", "--eval-windows", "0", "--method", "rtn",
            "--metric", "owq", "--dtype-rest", "fp32", "--offload-activations", "cpu", "--out", str(out)]
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 0, result.output
    text = (out / "config.json").read_text()
    qconfig = json.loads(text)["quantization_config"]
    expected = {"method": "rtn", "metric": "owq", "dtype_rest": "fp32"}
    assert {key: qconfig[key] for key in expected} == expected
    assert {key: qconfig["settings"][key] for key in (*expected, "bpw_error")} == {**expected, "bpw_error": "fisher"}
    assert all(f'"{key}": "{value}"' in text for key, value in expected.items())
    report = json.loads((out / "quantize_report.json").read_text())["config"]
    assert (report["offload_activations"], report["method"]) == ("cpu", "rtn")


def test_choice_fields_are_annotated_with_their_enum():
    hints = typing.get_type_hints(QuantConfig)
    assert (hints["method"], hints["metric"], hints["dtype_rest"], hints["bpw_error"]) == (
        QuantMethod, SaliencyMetric, RestDtype, BpwError)


def test_lm_eval_schema_adapters_are_found_by_the_plain_task_name(tmp_path):
    """task_config looks the adapters up by the name a user typed (lm-eval itself is not needed here)."""
    preprocessed, raw = tmp_path / "pre.jsonl", tmp_path / "raw.jsonl"
    preprocessed.write_text(json.dumps({"query": "q", "choices": ["a", "b"], "gold": 0}) + "\n")
    raw.write_text(json.dumps({"ctx_a": "c", "ctx_b": "d", "endings": ["a"], "label": 0}) + "\n")
    assert SCHEMA_OVERRIDES["hellaswag"](preprocessed) == {"process_docs": None, "doc_to_target": "gold"}
    assert SCHEMA_OVERRIDES["hellaswag"](raw) == {}
    assert SCHEMA_OVERRIDES["boolq"](raw)["doc_to_target"]({"label": True}) == 1
    assert "piqa" not in SCHEMA_OVERRIDES
