"""LoRA on packed models through peft's custom dispatch: the output formula, what trains, save and load."""

import json

import pytest
import torch
from conftest import random_quik
from torch import nn

pytest.importorskip("peft")

from quikft.checkpoint import load  # noqa: E402
from quikft.integrations.peft import QuikLoraLinear, add_lora, load_lora  # noqa: E402


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = random_quik(bias=True)
        self.gain = nn.Parameter(torch.ones(40))  # a model has float parameters besides its packed layers

    def forward(self, x):
        return self.proj(x * self.gain)


def _randomize_b(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()


def test_adapter_output_is_the_packed_output_plus_scaled_b_a_x_and_only_a_b_train():
    block = Block()
    base = block.proj
    x = torch.randn(3, 5, 40)
    expected_base = base(x).detach()
    model = add_lora(block, rank=4, alpha=12)
    layer = model.base_model.model.proj
    assert isinstance(layer, QuikLoraLinear) and layer.base_layer is base  # the packed layer itself, no copy
    _randomize_b(model)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    out = model(x)
    torch.testing.assert_close(out, expected_base + (x @ a.t() @ b.t()) * 3.0, rtol=1e-5, atol=1e-5)
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == [
        "base_model.model.proj.lora_A.default.weight", "base_model.model.proj.lora_B.default.weight"]
    out.sum().backward()
    assert a.grad is not None and b.grad is not None
    # the frozen base is still the packed layer: integer codes, no dequantized weight kept
    assert base.qweight.dtype == torch.int32 and base._cache is None and not base.cache_dequantized
    assert not any(isinstance(m, nn.Linear) and m.weight.shape == (24, 40) for m in model.modules())
    with pytest.raises(ValueError, match="cannot be merged"):
        layer.merge()


def test_gradient_to_the_input_flows_through_the_packed_base():
    model = add_lora(Block(), rank=2)
    x = torch.randn(4, 40, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_saved_adapter_loads_on_top_of_the_packed_model(packed, tmp_path):
    model = add_lora(load(packed, dtype=torch.float32), rank=4)
    _randomize_b(model)
    ids = torch.randint(0, 300, (1, 24))
    with torch.no_grad():
        trained = model(input_ids=ids).logits
        plain = load(packed, dtype=torch.float32)(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    for loaded in (load_lora(tmp_path / "adapter"), load_lora(tmp_path / "adapter", load(packed, dtype=torch.float32))):
        assert any(isinstance(m, QuikLoraLinear) for m in loaded.modules())
        with torch.no_grad():
            again = loaded(input_ids=ids).logits
        torch.testing.assert_close(again, trained, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(trained, plain, atol=1e-3)  # the adapter changes the output


def test_load_lora_names_the_missing_adapter(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_lora(tmp_path)


def test_a_model_without_packed_layers_is_refused(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="QuikLinear"):
        add_lora(model)


def test_an_adapter_refuses_a_base_it_was_not_trained_on(packed, tmp_path):
    from quikft.integrations.peft import save_lora
    from quikft.nn import quik_layers

    model = add_lora(load(packed, dtype=torch.float32), rank=4)
    _randomize_b(model)
    save_lora(model, tmp_path / "adapter")
    load_lora(tmp_path / "adapter", load(packed, dtype=torch.float32))  # its own base: fine
    other = load(packed, dtype=torch.float32)
    layer = next(iter(quik_layers(other).values()))
    layer.clear_cache()
    with torch.no_grad():
        layer.salient_weight.add_(1)  # another quantization of the same shapes
    with pytest.raises(ValueError, match="trained on another packed base") as err:
        load_lora(tmp_path / "adapter", other)
    assert "\n" not in str(err.value)
    fewer = load(packed, dtype=torch.float32)
    name = next(iter(quik_layers(fewer)))
    parent, _, child = name.rpartition(".")
    setattr(fewer.get_submodule(parent), child, nn.Identity())
    with pytest.raises(ValueError, match=r"trained on a base with \d+ packed layers; this model has"):
        load_lora(tmp_path / "adapter", fewer)


@pytest.mark.parametrize("edit", [{"r": 8}, {"target_modules": ["nothing_matches"]}, {"r": "eight"}])
def test_an_adapter_whose_config_was_edited_is_a_one_line_error(packed, tmp_path, edit):
    from quikft.integrations.peft import save_lora

    model = add_lora(load(packed, dtype=torch.float32), rank=4)
    save_lora(model, tmp_path / "adapter")
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **edit}))
    with pytest.raises(ValueError, match=r"adapter_config\.json does not match the adapter's weights|"
                                         r"adapter_config\.json: not a LoRA config") as err:
        load_lora(tmp_path / "adapter", load(packed, dtype=torch.float32))
    assert "\n" not in str(err.value) and len(str(err.value)) < 1024
