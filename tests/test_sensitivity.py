"""Layer sensitivity (the ``fisher`` budget error): the block-by-block backward walk equals plain autograd
through the whole model, on every family shape, and the budget spends its bits where the loss is sensitive."""

import pytest
import torch
import torch.nn.functional as F
from families import build_family

from quikft import arch
from quikft.config import QuantConfig
from quikft.quant.budget import plan_budget
from quikft.quant.loop import Walk
from quikft.quant.sensitivity import SENSITIVITY_WINDOWS, layer_sensitivity


def _autograd_sensitivity(model, layout, windows) -> dict[str, torch.Tensor]:
    """Mean squared gradient of the summed next-token loss at every layer's output channels, by one backward
    of the whole model."""
    totals: dict[str, list] = {}
    handles = []

    def add(total, grad):
        flat = grad.double().reshape(-1, grad.shape[-1])
        total[0], total[1] = total[0] + flat.square().sum(dim=0), total[1] + flat.shape[0]

    for index in range(len(layout)):
        for name, module in layout.layers(index).items():
            total = totals.setdefault(f"{layout.block_name(index)}.{name}", [0.0, 0])

            def hook(module, args, output, total=total):
                output.register_hook(lambda grad: add(total, grad))
            handles.append(module.register_forward_hook(hook))
    logits = model(input_ids=windows, use_cache=False).logits.float()
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), windows[:, 1:].flatten(), reduction="sum")
    loss.backward()
    for handle in handles:
        handle.remove()
    return {name: total / count for name, (total, count) in totals.items() if count}


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt_neox", "mixtral"])
def test_the_block_walk_equals_autograd_through_the_whole_model(family, single_thread):
    from conftest import build_tokenizer

    tokenizer = build_tokenizer()
    model = build_family(family, tokenizer).float()
    layout = arch.prepare(model)
    # more windows than the pass uses, batches of 3: the pass takes the first SENSITIVITY_WINDOWS in batches
    calib = torch.randint(3, len(tokenizer), (SENSITIVITY_WINDOWS + 2, 40), generator=torch.Generator().manual_seed(1))
    ours = layer_sensitivity(model, layout, calib, Walk("cpu", progress=False), batch_size=3)
    reference = _autograd_sensitivity(model, layout, calib[:SENSITIVITY_WINDOWS])
    assert ours.keys() == reference.keys() and len(ours) >= 4 * len(layout)
    for name, value in reference.items():
        assert ours[name].dtype == torch.float32 and ours[name].shape == value.shape
        torch.testing.assert_close(ours[name].double(), value, rtol=1e-4, atol=1e-12, msg=name)
    assert all(bool((value > 0).any()) for value in ours.values())


def _candidates(loss_by_bits: dict[int, float], sensitivity: float) -> list[dict]:
    return [{"bits": bits, "salient": 0, "storage": bits * 100, "loss": loss, "energy": 1.0, "weights": 100,
             "fisher": loss * sensitivity} for bits, loss in loss_by_bits.items()]


def test_the_fisher_budget_gives_the_bits_to_the_sensitive_layer():
    """Two layers losing alike: weighed by sensitivity, the layer the loss is 100x more sensitive to takes
    the wider setting; the output error alone cannot tell them apart."""
    losses = {2: 4.0, 3: 1.0, 4: 0.25}
    config = QuantConfig(target_bpw=3.0, bpw_error="fisher")
    plan = plan_budget({"a": _candidates(losses, 1.0), "b": _candidates(losses, 100.0)}, config)
    assert (plan["layers"]["a"]["bits"], plan["layers"]["b"]["bits"]) == (2, 4) and plan["bits_per_weight"] <= 3.0
    flipped = plan_budget({"a": _candidates(losses, 100.0), "b": _candidates(losses, 1.0)}, config)
    assert (flipped["layers"]["a"]["bits"], flipped["layers"]["b"]["bits"]) == (4, 2)
    unweighed = [{key: value for key, value in m.items() if key != "fisher"} for m in _candidates(losses, 1.0)]
    with pytest.raises(ValueError, match="sensitivity"):
        plan_budget({"a": unweighed, "b": unweighed}, config)


def test_rows_are_weighed_by_their_channels_sensitivity():
    """The fisher error of a candidate is its rows' losses weighed by their channels' sensitivity: all weight
    on one channel gives that row's loss alone, uniform weight gives the layer's loss."""
    from quikft.quant.budget import measure_layer
    from quikft.quant.gptq import HessianAccumulator
    from quikft.quant.layer import choose_salient, quantize_linear
    from quikft.quant.saliency import ColumnStats
    from quikft.quant.statistics import LayerStats

    generator = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(48, 24, bias=False)
    torch.nn.init.normal_(linear.weight, std=0.05, generator=generator)
    x = torch.randn(256, 48, generator=generator)
    accumulator, columns = HessianAccumulator(48), ColumnStats(48)
    accumulator.add_batch(x)
    columns.update(x)
    stats = LayerStats(accumulator, columns)
    config = QuantConfig(group_size=16, target_bpw=4.0, clip_search=False)  # the measurement searches coarser
    uniform = measure_layer(linear, "layer", stats, config, torch.ones(24))
    assert all(m["fisher"] == pytest.approx(m["loss"], rel=1e-9) and m["sensitivity"] == 1.0 for m in uniform)
    single = torch.zeros(24)
    single[5] = 2.0
    one_row = measure_layer(linear, "layer", stats, config, single)
    for m in one_row:
        scheme = QuantConfig(group_size=16, bits=m["bits"], salient=m["salient"], clip_search=False)
        columns_at_4 = choose_salient(linear.weight.detach(), columns, QuantConfig(bits=4, salient=m["salient"]), "layer")
        delta = quantize_linear(linear, stats, scheme, columns_at_4).weight - linear.weight.detach()
        row = 0.5 * float((delta[5] @ accumulator.hessian()) @ delta[5])
        assert m["fisher"] == pytest.approx(2.0 * row, rel=1e-5)


def test_a_hot_channel_outside_the_even_spread_is_measured_exactly():
    """On a layer with more rows than are measured, a channel carrying most of the sensitivity is always in
    the sample and stands for itself: its weighed loss is exact, not an even-spread guess."""
    from quikft.quant.budget import MEASURED_ROWS, measure_layer
    from quikft.quant.gptq import HessianAccumulator
    from quikft.quant.layer import quantize_linear
    from quikft.quant.saliency import ColumnStats
    from quikft.quant.statistics import LayerStats

    rows, hot = 2 * MEASURED_ROWS, 3  # row 3 is not in the even spread (every second row from 0... is; 3 is odd)
    generator = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(32, rows, bias=False)
    torch.nn.init.normal_(linear.weight, std=0.05, generator=generator)
    x = torch.randn(256, 32, generator=generator)
    accumulator, columns = HessianAccumulator(32), ColumnStats(32)
    accumulator.add_batch(x)
    columns.update(x)
    sensitivity = torch.full((rows,), 1e-9)
    sensitivity[hot] = 1.0
    config = QuantConfig(group_size=16, target_bpw=4.0, clip_search=False)
    stats = LayerStats(accumulator, columns)
    for m in measure_layer(linear, "layer", stats, config, sensitivity):
        if m["salient"]:
            continue
        scheme = QuantConfig(group_size=16, bits=m["bits"], salient=0, clip_search=False)
        delta = quantize_linear(linear, stats, scheme).weight - linear.weight.detach()
        row = 0.5 * float((delta[hot] @ accumulator.hessian()) @ delta[hot])
        assert m["fisher"] == pytest.approx(row, rel=1e-3)
