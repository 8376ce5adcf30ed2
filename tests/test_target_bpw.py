"""--target-bpw (issue 23): bits and salient columns per layer under a bit budget, a mixed-bits checkpoint
every loader, kernel and command reads, and budgets refused before any work."""

import copy
import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner

from quikft.bits import layer_bits
from quikft.checkpoint import load, save_packed, stored_bits
from quikft.cli import main
from quikft.config import ConfigError, QuantConfig, build_config
from quikft.data import calibration_windows
from quikft.nn import QuikLinear, available_kernels, get_kernel, why_not
from quikft.quant.allocate import BudgetError
from quikft.quant.budget import candidate_settings, check_budget
from quikft.quant.model import quantize_model

# Every bit-width and k in {0, 16} over the tiny model's 14 layers.
MIX = [(2, 0), (3, 16), (4, 0), (8, 0), (2, 16), (4, 16), (3, 0)]
# How far each activation precision may move a layer's output (relative Frobenius error).
TOLERANCE = {"model": 1e-5, "bf16": 3e-2, "int8": 6e-2}


def _config(**settings):
    return QuantConfig(**{"group_size": 32, "nsamples": 4, "seqlen": 32, "clip_search": False,
                          "dtype_rest": "fp32", **settings})


def _forced_plan(model) -> dict:
    names = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers." in name]
    return {"layers": {name: {"bits": MIX[i % len(MIX)][0], "salient": MIX[i % len(MIX)][1]}
                       for i, name in enumerate(names)}}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, tiny_dir):
    """A checkpoint of the tiny model with a forced mix of 2/3/4/8 bits and k = 0/16, its fake-quant
    model and the plan."""
    from quikft.models import load_model

    model, tokenizer = load_model(str(tiny_dir))
    calib = torch.randint(3, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    config = _config(target_bpw=5.0)
    plan = _forced_plan(model)
    quantized = quantize_model(model, calib, config, progress=False, plan=plan)
    out = save_packed(model, tokenizer, quantized, tmp_path_factory.mktemp("mixed") / "ckpt", config)
    return out, model, plan, calib


def test_a_forced_mix_round_trips_through_every_loader(mixed, exact_kernels):
    from transformers import AutoModelForCausalLM

    out, fake, plan, calib = mixed
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qconfig["layer_bits"] == {name: setting["bits"] for name, setting in plan["layers"].items()}
    ids = calib[:2]
    with torch.no_grad():
        expected = fake(input_ids=ids).logits
        for loaded in (load(out, dtype=torch.float32), AutoModelForCausalLM.from_pretrained(out)):
            for name, setting in plan["layers"].items():
                layer = loaded.get_submodule(name)
                assert isinstance(layer, QuikLinear)
                assert (layer.bits, layer.k) == (setting["bits"], setting["salient"])
            torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=1e-4, rtol=0)
    info = CliRunner().invoke(main, ["info", "--verify", str(out)])
    assert info.exit_code == 0, info.output
    assert "sha256 of" in info.output


def test_every_kernel_runs_the_mixed_layers_it_accepts(mixed):
    out, _, plan, _ = mixed
    model = load(out, dtype=torch.float32, kernel="torch")
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    ran = set()
    for name in plan["layers"]:
        layer = model.get_submodule(name)
        inputs = x if layer.in_features == 64 else torch.randn(3, layer.in_features)
        with torch.no_grad():
            reference = layer(inputs)
            for kernel in available_kernels():
                if why_not(get_kernel(kernel), layer.layout(), torch.device("cpu"), torch.float32) is not None:
                    continue
                layer.kernel = kernel
                error = (layer(inputs) - reference).norm() / reference.norm()
                assert error <= TOLERANCE[get_kernel(kernel).activations], (name, kernel, float(error))
                ran.add((kernel, layer.bits))
            layer.kernel = "torch"
    assert {bits for _, bits in ran} == {2, 3, 4, 8}
    assert {kernel for kernel, _ in ran} >= {"torch"}, ran


def test_the_budget_is_met_and_recorded(tiny, text_file, tmp_path, exact_kernels):
    model, tokenizer = tiny
    fake = copy.deepcopy(model)
    calib = calibration_windows(tokenizer, str(text_file), nsamples=4, seqlen=32, seed=0)
    shapes = {name: (m.in_features, m.out_features) for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and "layers." in name}
    weights = sum(i * o for i, o in shapes.values())
    for target in (3.5, 5.0):
        model = copy.deepcopy(fake)
        config = _config(target_bpw=target)
        quantized = quantize_model(model, calib, config, progress=False)
        plan = quantized.plan
        storage = sum(layer_bits(*shapes[name], s["bits"], s["salient"], 32) for name, s in plan["layers"].items())
        assert storage / weights <= target and plan["bits_per_weight"] == pytest.approx(storage / weights)
        assert all((s["bits"], s["salient"]) in candidate_settings(shapes[name][0])
                   for name, s in plan["layers"].items())
        out = save_packed(model, tokenizer, quantized, tmp_path / f"t{target}", config)
        counted = stored_bits(out)
        assert counted.linear_bpw == pytest.approx(plan["bits_per_weight"]) and counted.linear_bpw <= target
        assert len(plan["candidates"]) == len(shapes)
    # a larger budget buys a smaller predicted error
    small = quantize_model(copy.deepcopy(fake), calib, _config(target_bpw=3.5), progress=False).plan
    large = quantize_model(copy.deepcopy(fake), calib, _config(target_bpw=8.0), progress=False).plan
    assert large["predicted_error"] < small["predicted_error"]


def test_budgets_outside_the_range_and_contradicting_flags_are_refused_before_work():
    shapes = {"a": (576, 576), "b": (576, 1536)}
    for target in (1.5, 12.0):
        with pytest.raises(BudgetError, match=r"outside what this model's layers can store: \d\.\d\d to \d+\.\d\d"):
            check_budget(shapes, QuantConfig(target_bpw=target))
    check_budget(shapes, QuantConfig(target_bpw=4.0))
    for flag in ({"bits": 4}, {"salient": 16}):
        with pytest.raises(ConfigError, match=f"--target-bpw chooses bits and salient columns per layer; drop "
                                              f"--{next(iter(flag))}"):
            build_config(QuantConfig, None, target_bpw=3.5, **flag)
    with pytest.raises(ConfigError, match="target_bpw"):
        QuantConfig(target_bpw=-1.0)


def test_the_cli_refuses_a_budget_in_one_line_before_loading(tiny_dir, text_file, tmp_path):
    args = ["quantize", "--model", str(tiny_dir), "--calib", str(text_file), "--nsamples", "4", "--seqlen", "32",
            "--group-size", "32", "--eval-windows", "0", "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(main, [*args, "--target-bpw", "1.2"])
    assert result.exit_code == 1 and "Error: --target-bpw 1.2 is outside" in result.output
    assert result.output.count("\n") == 1 and not (tmp_path / "out").exists()
    result = CliRunner().invoke(main, [*args, "--target-bpw", "3", "--bits", "4"])
    assert result.exit_code == 1 and "drop --bits" in result.output


def test_a_mixed_checkpoint_recovers_and_evaluates(mixed, corpus, tmp_path, text_file):
    from conftest import recover_config

    from quikft.recovery import recover

    out, _, plan, _ = mixed
    report = recover(recover_config(out, corpus, tmp_path / "post", steps=2), progress=False)
    recovered = load(tmp_path / "post", dtype=torch.float32)
    for name, setting in plan["layers"].items():
        assert recovered.get_submodule(name).bits == setting["bits"]
    assert report["bits_per_weight"]["linear"] == pytest.approx(stored_bits(out).linear_bpw)
    result = CliRunner().invoke(main, ["eval", "--model", str(tmp_path / "post"), "--ppl", str(text_file),
                                       "--seqlen", "32", "--max-windows", "2"])
    assert result.exit_code == 0 and "ppl" in result.output, result.output


def test_pre_mode_refuses_a_budget_preset(tiny_dir, corpus, tmp_path):
    from conftest import recover_config

    from quikft.recovery import recover

    preset = tmp_path / "budget.yaml"
    preset.write_text("target_bpw: 4.0\n")
    with pytest.raises(ConfigError, match="--mode pre trains salient columns it then keeps"):
        recover(recover_config(tiny_dir, corpus, tmp_path / "pre", mode="pre", quant_config=str(preset)),
                progress=False)


# ------------------------------------------------------------------------ the measurement's shortcuts


def _layer(rows: int, cols: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * cols, cols, generator=generator) * torch.rand(cols, generator=generator) * 3
    return torch.randn(rows, cols, generator=generator) * 0.05, 2 * x.T @ x / x.shape[0]


@pytest.mark.parametrize("grid", [{"group_size": 32, "sym": False}, {"group_size": -1, "sym": True},
                                  {"group_size": 32, "sym": True, "clip_search": False}])
def test_stacked_widths_give_the_losses_of_separate_gptq_runs(grid):
    from quikft.quant.gptq import gptq_quantize, gptq_row_losses
    from quikft.quant.grid import COARSE_SHRINK_FACTORS
    from quikft.quant.scheme import QuantScheme

    weight, hessian = _layer(40, 96)
    scheme = QuantScheme.of(QuantConfig(**grid))
    for salient in (torch.arange(0), torch.tensor([3, 50, 77])):
        stacked = gptq_row_losses(weight, hessian, salient, [2, 3, 4, 8], scheme).sum(dim=1).tolist()
        search = COARSE_SHRINK_FACTORS if scheme.clip_search else False  # the measurement's coarse search
        separate = [gptq_quantize(weight, hessian, salient,
                                  dataclasses.replace(scheme, bits=bits, clip_search=search)).loss
                    for bits in (2, 3, 4, 8)]
        assert stacked == pytest.approx(separate, rel=1e-6)
        assert stacked[0] > stacked[1] > stacked[2] > stacked[3]


def test_per_row_widths_fit_each_row_as_its_own_width():
    from quikft.quant.grid import fake_quantize, fit_scale_zero

    weight, _ = _layer(12, 64)
    widths = torch.tensor([2.0, 3.0, 4.0, 8.0]).repeat_interleave(3)[:, None]
    for sym in (False, True):
        scale, zero = fit_scale_zero(weight, widths, sym)
        for row in range(12):
            bits = int(widths[row])
            s, z = fit_scale_zero(weight[row:row + 1], bits, sym)
            assert torch.equal(scale[row:row + 1], s) and torch.equal(zero[row:row + 1], z)
            assert torch.equal(fake_quantize(weight[row:row + 1], s, z, bits),
                               fake_quantize(weight, scale, zero, widths)[row:row + 1])
    with pytest.raises(ConfigError, match="bits must be one of"):
        fit_scale_zero(weight, torch.full((12, 1), 5.0), False)


def _measured_and_exact(rows: int, cols: int) -> tuple[dict, dict]:
    from quikft.quant.budget import measure_layer
    from quikft.quant.gptq import HessianAccumulator
    from quikft.quant.layer import choose_salient, quantize_linear
    from quikft.quant.saliency import ColumnStats
    from quikft.quant.statistics import LayerStats

    weight, _ = _layer(rows, cols, seed=1)
    linear = torch.nn.Linear(cols, rows, bias=False)
    linear.weight.data.copy_(weight)
    x = torch.randn(512, cols, generator=torch.Generator().manual_seed(2)) * torch.linspace(0.1, 3, cols)
    accumulator, columns = HessianAccumulator(cols), ColumnStats(cols)
    accumulator.add_batch(x)
    columns.update(x)
    stats = LayerStats(accumulator, columns)
    config = _config(target_bpw=4.0)
    measured = {(m["bits"], m["salient"]): m["loss"] for m in measure_layer(linear, "layer", stats, config)}
    # every width of one k is measured with the columns the metric picks at the widest (4 bits)
    picked = {k: choose_salient(weight, columns, _config(bits=4, salient=k), "layer") for k in (16, 32)}
    exact = {setting: quantize_linear(linear, stats, _config(bits=setting[0], salient=setting[1]),
                                      picked.get(setting[1])).loss
             for setting in measured}
    return measured, exact


def test_small_layers_are_measured_exactly_as_quantized_with_the_measured_columns():
    measured, exact = _measured_and_exact(rows=96, cols=64)
    assert set(measured) == set(candidate_settings(64))
    for setting, loss in measured.items():
        assert loss == pytest.approx(exact[setting], rel=1e-6), setting


def test_a_large_layer_is_measured_on_a_row_sample_that_estimates_its_loss():
    from quikft.quant.budget import MEASURED_ROWS, SENSITIVE_ROWS, sample_rows

    rows = 4 * MEASURED_ROWS
    even = sample_rows(rows)
    assert even.rows.tolist() == list(range(0, rows, 4)) and torch.all(even.scale == 4.0)
    assert sample_rows(100).rows.numel() == 100 and torch.all(sample_rows(100).scale == 1.0)
    # the most sensitive channels stand for themselves, the rest for their share: the scales add up to every row
    weight = torch.rand(rows, generator=torch.Generator().manual_seed(3))
    stratified = sample_rows(rows, weight)
    assert set(torch.topk(weight, SENSITIVE_ROWS).indices.tolist()) <= set(stratified.rows.tolist())
    assert stratified.rows.unique().numel() == MEASURED_ROWS and float(stratified.scale.sum()) == pytest.approx(rows)
    measured, exact = _measured_and_exact(rows=rows, cols=64)
    for setting, loss in measured.items():
        assert loss == pytest.approx(exact[setting], rel=0.1), setting
    # the estimate keeps every layer's ranking of its candidates by width
    for k in (0, 16, 32):
        assert measured[(2, k)] > measured[(3, k)] > measured[(4, k)]
