"""Layer sensitivity (the ``fisher`` budget error): the block-by-block backward walk equals plain autograd
through the whole model, on every family shape, and the budget spends its bits where the loss is sensitive."""

import pytest
import torch
import torch.nn.functional as F
from families import build_family

from quikft import arch
from quikft.config import QuantConfig
from quikft.quant.budget import plan_budget
from quikft.quant.pipeline import BlockHooks
from quikft.quant.sensitivity import SENSITIVITY_WINDOWS, layer_sensitivity


def _autograd_sensitivity(model, layout, windows) -> dict[str, float]:
    """Mean squared gradient of the summed next-token loss at every layer's output, by one backward of the
    whole model."""
    totals: dict[str, list] = {}
    handles = []
    for index in range(len(layout)):
        for name, module in layout.layers(index).items():
            total = totals.setdefault(f"{layout.block_name(index)}.{name}", [0.0, 0])

            def hook(module, args, output, total=total):
                output.register_hook(lambda g: total.__setitem__(0, total[0] + float(g.double().square().sum()))
                                     or total.__setitem__(1, total[1] + g.numel()))
            handles.append(module.register_forward_hook(hook))
    logits = model(input_ids=windows, use_cache=False).logits.float()
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), windows[:, 1:].flatten(), reduction="sum")
    loss.backward()
    for handle in handles:
        handle.remove()
    return {name: total / count if count else 0.0 for name, (total, count) in totals.items()}


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt_neox", "mixtral"])
def test_the_block_walk_equals_autograd_through_the_whole_model(family, single_thread):
    from conftest import build_tokenizer

    tokenizer = build_tokenizer()
    model = build_family(family, tokenizer).float()
    layout = arch.prepare(model)
    # more windows than the pass uses, batches of 3: the pass takes the first SENSITIVITY_WINDOWS in batches
    calib = torch.randint(3, len(tokenizer), (SENSITIVITY_WINDOWS + 2, 40), generator=torch.Generator().manual_seed(1))
    ours = layer_sensitivity(model, layout, calib, BlockHooks(), ("cpu", 3), progress=False)
    reference = _autograd_sensitivity(model, layout, calib[:SENSITIVITY_WINDOWS])
    assert ours.keys() == reference.keys() and len(ours) >= 4 * len(layout)
    for name, value in reference.items():
        assert ours[name] == pytest.approx(value, rel=1e-4, abs=1e-12), name
    assert all(value > 0 for name, value in ours.items() if "experts" not in name)


def _candidates(loss_by_bits: dict[int, float]) -> list[dict]:
    return [{"bits": bits, "salient": 0, "storage": bits * 100, "loss": loss, "energy": 1.0, "weights": 100}
            for bits, loss in loss_by_bits.items()]


def test_the_fisher_budget_gives_the_bits_to_the_sensitive_layer():
    """Two layers losing alike: by output error the budget splits evenly; weighed by sensitivity, the layer
    the loss is 100x more sensitive to takes the wider setting."""
    measured = {"a": _candidates({2: 4.0, 3: 1.0, 4: 0.25}), "b": _candidates({2: 4.0, 3: 1.0, 4: 0.25})}
    config = QuantConfig(target_bpw=3.0, bpw_error="fisher")
    plan = plan_budget(measured, config, sensitivity={"a": 1.0, "b": 100.0})
    assert (plan["layers"]["a"]["bits"], plan["layers"]["b"]["bits"]) == (2, 4)
    assert plan["layers"]["b"]["sensitivity"] == 100.0 and plan["bits_per_weight"] <= 3.0
    flipped = plan_budget(measured, config, sensitivity={"a": 100.0, "b": 1.0})
    assert (flipped["layers"]["a"]["bits"], flipped["layers"]["b"]["bits"]) == (4, 2)
    with pytest.raises(ValueError, match="sensitivity"):
        plan_budget(measured, config)
