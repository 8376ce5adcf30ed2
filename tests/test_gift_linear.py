"""GiftLinear: what trains, the noise (scale, placement, eval, checkpointing), export back to the packed layer."""

import pytest
import torch
from conftest import random_quik as _quik
from torch import nn

from quikft.quant.grid import paper_step
from quikft.recovery.gift_linear import GiftLinear, gift_layers, unwrap_after_training, wrap_for_training
from quikft.recovery.training import set_activation_checkpointing


def _linear(out_features=24, in_features=40, seed=0, bias=False):
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=bias)
    return layer


SALIENT = torch.tensor([1, 5, 17, 30])


def test_pre_layer_matches_the_linear_in_eval_and_keeps_one_weight_copy():
    linear = _linear(bias=True)
    reference = linear.weight.detach().clone()
    x = torch.randn(3, 7, 40)
    expected = linear(x)
    storage = linear.weight.data.data_ptr()
    layer = GiftLinear.from_linear(linear, SALIENT, noise_bits=3).eval()
    assert layer.base_weight.data_ptr() == storage  # the frozen rest is the original storage, not a copy
    assert torch.equal(layer.base_weight[:, SALIENT], torch.zeros(24, 4))
    assert torch.equal(layer.salient_weight.detach(), reference[:, SALIENT])
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    merged = layer.to_linear()
    assert torch.equal(merged.weight.detach(), reference)


def test_post_layer_matches_the_packed_layer_in_eval():
    quik = _quik()
    x = torch.randn(2, 5, 40)
    expected = quik(x)
    layer = GiftLinear.from_quik(quik, noise_bits=4).eval()
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("source", ["fp", "quantized"])
def test_only_the_salient_slice_gets_gradients_and_it_is_x_s_times_dy(source):
    layer = (GiftLinear.from_linear(_linear(), SALIENT, noise_bits=3) if source == "fp"
             else GiftLinear.from_quik(_quik(), noise_bits=4)).train()
    params = [name for name, p in layer.named_parameters() if p.requires_grad]
    assert params == ["salient_weight"]
    x = torch.randn(9, 40, requires_grad=True)
    dy = torch.randn(9, 24)
    layer(x).backward(dy)
    expected = dy.t() @ x.detach()[:, layer.salient_idx]
    torch.testing.assert_close(layer.salient_weight.grad, expected, rtol=1e-5, atol=1e-5)
    assert x.grad is not None and x.grad.abs().sum() > 0  # input gradients flow through the frozen part
    assert all(b.grad is None for b in layer.buffers())


def test_noise_std_is_half_the_row_step_of_the_nonsalient_weights():
    linear = _linear(out_features=32, in_features=64)
    weight = linear.weight.detach().clone()
    layer = GiftLinear.from_linear(linear, SALIENT, noise_bits=3)
    keep = torch.tensor([j for j in range(64) if j not in SALIENT.tolist()])
    expected = 0.5 * paper_step(weight[:, keep], 3).squeeze(1)
    torch.testing.assert_close(layer.noise_std, expected, rtol=0, atol=0)


def test_training_noise_has_the_formula_std_only_on_nonsalient_columns_and_none_in_eval():
    torch.manual_seed(0)
    layer = GiftLinear.from_quik(_quik(out_features=16, in_features=400, k=40), noise_bits=4)
    eye = torch.eye(400)  # y[j] = column j of the effective weight
    layer.eval()
    clean = layer(eye)
    assert torch.equal(layer(eye), clean)  # eval is deterministic: no noise
    layer.train()
    draws = torch.stack([layer(eye) - clean for _ in range(50)])  # (draws, in, out)
    salient = layer.salient_idx
    assert draws[:, salient].abs().max() < 1e-6  # never on salient columns
    nonsalient = draws[:, layer.nonsalient_idx]  # (draws, in-k, out)
    std = nonsalient.reshape(-1, 16).std(dim=0)
    torch.testing.assert_close(std, layer.noise_std, rtol=0.03, atol=0)  # 18,000 samples per row
    assert not torch.equal(draws[0], draws[1])  # resampled every forward


def test_noise_free_layers_train_without_noise():
    layer = GiftLinear.from_quik(_quik(), noise_bits=None).train()
    x = torch.randn(4, 40)
    assert torch.equal(layer(x), layer(x))


def test_bf16_autocast_keeps_the_parameter_fp32():
    layer = GiftLinear.from_quik(_quik(), noise_bits=4).train()
    x = torch.randn(4, 40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.salient_weight.dtype == torch.float32 and layer.salient_weight.grad.dtype == torch.float32


def test_export_keeps_codes_bit_identical_and_stores_the_trained_columns():
    quik = _quik()
    before = {k: v.clone() for k, v in quik.state_dict().items()}
    layer = GiftLinear.from_quik(quik, noise_bits=4)
    with torch.no_grad():
        layer.salient_weight.add_(0.123)
    exported = layer.to_quik()
    for name in ("qweight", "qzeros", "scales", "g_idx", "salient_idx"):
        assert torch.equal(exported.state_dict()[name], before[name]), name
    assert torch.equal(exported.salient_weight, (before["salient_weight"].float() + 0.123).half())


def test_wrapping_a_model_trains_only_salient_slices_and_unwraps_back(tiny):
    model, _ = tiny
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and "layers" in n]
    salient = {n: torch.tensor([0, 3, 9]) for n in names}
    originals = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    layers = wrap_for_training(model, noise_bits=3, salient=salient)
    assert set(layers) == set(names)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == [f"{n}.salient_weight" for n in names]
    ids = torch.randint(0, 300, (2, 16))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(layers[n].salient_weight.grad is not None for n in names)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    optimizer.step()
    assert len(optimizer.state) == len(names)  # optimizer state only for the salient slices
    unwrap_after_training(model)
    assert not gift_layers(model)
    for n in names:
        weight = model.get_submodule(n).weight.detach()
        keep = [j for j in range(weight.shape[1]) if j not in (0, 3, 9)]
        assert torch.equal(weight[:, keep], originals[n][:, keep])  # frozen columns untouched
        assert not torch.equal(weight[:, [0, 3, 9]], originals[n][:, [0, 3, 9]])  # trained ones moved


def test_gradient_checkpointing_recomputes_the_same_noise(tiny):
    model, _ = tiny
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and "layers" in n]
    layers = wrap_for_training(model, noise_bits=2, salient={n: torch.tensor([1, 2]) for n in names})
    ids = torch.randint(0, 300, (2, 24))
    model.train()

    def grads(checkpointing: bool):
        set_activation_checkpointing(model, checkpointing)
        model.train()
        model.zero_grad()
        torch.manual_seed(123)
        model(input_ids=ids, labels=ids).loss.backward()
        return [layers[n].salient_weight.grad.clone() for n in names]

    plain, checkpointed = grads(False), grads(True)
    for a, b in zip(plain, checkpointed, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
