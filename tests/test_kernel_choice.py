"""Kernels chosen by measurement (per row class, cached per machine), forcing, the ONNX Runtime kernels'
own contract, and the bf16 tied head."""

import json

import pytest
import torch
from test_kernels import exact_input, exact_layer

from quikft.hardware import machine_key
from quikft.nn import autotune, get_kernel, keep_tied_head_in_bf16, ort_kernel, prepare_for_inference, why_not
from quikft.nn.kernels import DEFAULT_ACTIVATIONS

CPU = torch.device("cpu")
needs_ort = pytest.mark.skipif(not ort_kernel.ort_available(), reason="onnxruntime not installed")


@pytest.fixture
def timings(tmp_path, monkeypatch):
    """A fresh timing cache under a temporary $QUIKFT_CACHE."""
    monkeypatch.setenv("QUIKFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(autotune.TIMINGS_ENV, raising=False)
    monkeypatch.setattr(autotune, "_CACHE", None)
    return tmp_path / "cache" / "kernels" / f"{machine_key()}.json"


def test_choice_is_measured_once_cached_and_repeatable(timings, monkeypatch):
    layer = exact_layer(3, 7, (64, 160), 32, True, bias=True)
    plan = autotune.choose(layer, CPU, torch.float32)
    allowed = {k.name for k in autotune.candidates(layer.layout(), CPU, torch.float32)}
    assert set(plan) == set(autotune.ROW_CLASSES) and set(plan.values()) <= allowed
    stored = json.loads(timings.read_text())
    entry = stored["layouts"][autotune.layout_key(layer.layout(), torch.float32)]
    assert set(entry) == allowed and all(set(t) == set(autotune.ROW_CLASSES) for t in entry.values())
    decode, prefill = plan[autotune.DECODE], plan[autotune.PREFILL]
    assert entry[decode]["decode"] == min(t["decode"] for t in entry.values())  # the fastest measured one
    fastest_prefill = min(t["prefill"] for t in entry.values())
    if prefill == decode:  # one copy of the weights unless a second kernel is much faster for prefill
        assert entry[decode]["prefill"] < autotune.PREFILL_SECOND_KERNEL_MIN_GAIN * fastest_prefill
    else:
        assert entry[prefill]["prefill"] == fastest_prefill
    assert stored["machine"]["threads"] == torch.get_num_threads()

    def no_timing(*args):
        raise AssertionError("a cached layout was measured again")

    monkeypatch.setattr(autotune, "time_kernels", no_timing)
    monkeypatch.setattr(autotune, "_CACHE", None)  # a new process: read from the file
    again = exact_layer(3, 7, (64, 160), 32, True, bias=True, seed=9)  # same layout, other values
    assert autotune.choose(again, CPU, torch.float32) == plan
    x = exact_input(2, 160)
    first, second = exact_layer(3, 7, (64, 160), 32, True, bias=True), exact_layer(3, 7, (64, 160), 32, True, bias=True)
    assert torch.equal(first(x), second(x))  # identical choices give identical outputs


def test_a_corrupt_cache_is_measured_again(timings):
    timings.parent.mkdir(parents=True)
    timings.write_text("{not json")
    layer = exact_layer(3, 7, (64, 160), 32, True, bias=False)
    assert set(autotune.choose(layer, CPU, torch.float32)) == set(autotune.ROW_CLASSES)
    assert "layouts" in json.loads(timings.read_text())


def write_timings(path, layer, dtype, table):
    path.parent.mkdir(parents=True, exist_ok=True)
    key = autotune.layout_key(layer.layout(), dtype)
    path.write_text(json.dumps({"layouts": {key: table}}))


@needs_ort
def test_decode_and_prefill_run_their_own_kernels(timings):
    layer = exact_layer(3, 7, (64, 160), 32, True, bias=True)
    names = [k.name for k in autotune.candidates(layer.layout(), CPU, torch.float32)]
    table = {name: {"decode": 100.0, "prefill": 100.0} for name in names}
    table["cpu-ort-int8"]["decode"] = 1.0
    table["cpu-int4"]["prefill"] = 1.0
    write_timings(timings, layer, torch.float32, table)
    counts = prepare_for_inference(layer, CPU, torch.float32)
    assert counts == {"cpu-ort-int8+cpu-int4": 1}
    assert layer.kernel_name == "cpu-ort-int8" and layer.prefill_kernel_name == "cpu-int4"
    assert layer.qweight is None  # the int4 copy restores the codes; neither kernel reads qweight
    assert layer.hidden_bytes() > 0  # ONNX Runtime's weights are counted
    one, many = exact_input(1, 160), exact_input(5, 160)
    for x, name in ((one, "cpu-ort-int8"), (many, "cpu-int4")):
        alone = exact_layer(3, 7, (64, 160), 32, True, bias=True)
        alone.kernel = name
        assert torch.equal(layer(x), alone(x))
    stored = exact_layer(3, 7, (64, 160), 32, True, bias=True).state_dict()
    assert all(torch.equal(layer.state_dict()[k], v) for k, v in stored.items())


@needs_ort
def test_a_small_prefill_gain_keeps_one_kernel(timings):
    layer = exact_layer(3, 7, (64, 160), 32, True, bias=True)
    names = [k.name for k in autotune.candidates(layer.layout(), CPU, torch.float32)]
    table = {name: {"decode": 100.0, "prefill": 100.0} for name in names}
    table["cpu-ort-int8"] = {"decode": 1.0, "prefill": 12.0}
    table["cpu-int4"]["prefill"] = 10.0  # faster, but not 1.5x: not worth a second copy of the weights
    write_timings(timings, layer, torch.float32, table)
    assert prepare_for_inference(layer, CPU, torch.float32) == {"cpu-ort-int8": 1}
    assert layer.prefill_state is None and layer.prefill_kernel_name == "cpu-ort-int8"


def test_policy_limits_the_candidates():
    layout = exact_layer(3, 7, (64, 160), 32, True, bias=False).layout()
    exact_only = autotune.candidates(layout, CPU, torch.float32, frozenset({"model"}))
    assert {k.activations for k in exact_only} == {"model"} and "torch" in {k.name for k in exact_only}
    assert {k.activations for k in autotune.candidates(layout, CPU, torch.float32)} <= DEFAULT_ACTIVATIONS


def test_forcing_a_kernel(monkeypatch, timings):
    layer = exact_layer(3, 7, (64, 160), 32, True, bias=False)
    assert prepare_for_inference(layer, CPU, torch.float32, kernel="torch") == {"torch": 1}
    monkeypatch.setenv(autotune.KERNEL_ENV, "cpu-int4")
    other = exact_layer(3, 7, (64, 160), 32, True, bias=False)
    assert prepare_for_inference(other, CPU, torch.float32) == {"cpu-int4": 1}
    monkeypatch.setenv(autotune.KERNEL_ENV, "no-such-kernel")
    with pytest.raises(KeyError, match="no-such-kernel.*registered"):
        prepare_for_inference(exact_layer(3, 7, (64, 160), 32, True, bias=False), CPU, torch.float32)
    assert not timings.exists()  # forced kernels measure nothing


def test_training_through_a_layer_uses_the_differentiable_reference(timings):
    layer = exact_layer(3, 7, (64, 160), 32, True, bias=False)
    x = exact_input(2, 160).requires_grad_()
    layer(x).sum().backward()
    assert layer.kernel_name == "torch" and x.grad is not None


# ------------------------------------------------------------------------------ ONNX Runtime


@needs_ort
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_ort_weights_hold_the_codes_scales_and_zero_points(bits):
    """Unpacking the arrays given to ONNX Runtime gives back the layer's weight exactly."""
    layer = exact_layer(bits, 5, (24, 100), 32, True, bias=False)
    block = ort_kernel.block_size(layer.layout())
    arrays, gather, pad = ort_kernel.ort_weights(layer, block)
    container = ort_kernel.CONTAINER_BITS[bits]
    n = layer.in_features - layer.k
    codes = ort_kernel._unpack_blocks(arrays["B"].reshape(layer.out_features, -1), container, n + pad)
    blocks = arrays["scales"].shape[1]
    zeros = ort_kernel._unpack_blocks(arrays["zero_points"], container, blocks)
    owner = torch.arange(n + pad) // block
    weight = (torch.from_numpy(codes).float() - torch.from_numpy(zeros).float()[:, owner]) \
        * torch.from_numpy(arrays["scales"])[:, owner]
    assert torch.all(weight[:, n:] == 0)  # padded columns weigh nothing
    full = torch.zeros(layer.out_features, layer.in_features)
    full[:, layer.perm.long()] = weight[:, :n]
    assert torch.equal(full, layer.dequantize_weight())
    assert gather.numel() == n + pad and torch.equal(gather[:n], layer.perm.long())


@needs_ort
def test_ort_keeps_the_codes_and_sizes_its_threads(timings):
    layer = exact_layer(4, 6, (48, 128), 64, True, bias=True)
    stored = {name: t.clone() for name, t in layer.state_dict().items()}
    weight = layer.effective_weight()
    prepare_for_inference(layer, CPU, torch.float32, kernel="cpu-ort-int8")
    assert layer.qweight is not None  # the prepacked weights cannot be read back
    # the fp16 salient weights live on as the kernel's fp32 copy only, and come back bit for bit
    assert "salient_weight" not in dict(layer.named_buffers())
    assert torch.equal(layer.salient_weight, stored["salient_weight"])
    state = layer.state_dict()
    assert state.keys() == stored.keys() and all(torch.equal(state[n], stored[n]) for n in stored)
    assert torch.equal(layer.effective_weight(), weight)
    options = layer.kernel_state.meta.session.get_session_options()
    assert options.intra_op_num_threads == ort_kernel.ort_threads(layer.layout())
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    y = layer(exact_input(3, 128))
    assert y.shape == (3, 48)
    again = layer(exact_input(3, 128))
    assert torch.equal(y, again) and y.data_ptr() != again.data_ptr()  # results never alias the bound buffer
    layer.kernel = "torch"  # another kernel gets the stored tensors back
    assert torch.equal(dict(layer.named_buffers())["salient_weight"], stored["salient_weight"])


def test_ort_refuses_in_one_line_without_onnxruntime(monkeypatch):
    monkeypatch.setattr(ort_kernel, "ort_available", lambda: False)
    layout = exact_layer(3, 7, (64, 160), 32, True, bias=False).layout()
    reason = why_not(get_kernel("cpu-ort-int8"), layout, CPU, torch.float32)
    assert "pip install 'quikft[cpu]'" in reason.text and "\n" not in reason.text


# ------------------------------------------------------------------------------ the tied head


def tied_model(exact_bf16: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    if exact_bf16:
        with torch.no_grad():
            model.model.embed_tokens.weight.copy_(model.model.embed_tokens.weight.bfloat16().float())
    return model


@pytest.mark.parametrize("slice_rows", [8192, 7])
def test_tied_head_in_bf16_is_exact_for_prefill_and_close_for_decode(slice_rows, monkeypatch):
    from quikft.nn import stored_head

    monkeypatch.setattr(stored_head, "PREFILL_SLICE_ROWS", slice_rows)  # 7: the table widened in 43 slices
    model = tied_model(exact_bf16=True)
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        state = {k: v.clone() for k, v in model.state_dict().items()}
        assert keep_tied_head_in_bf16(model)
        after = model(input_ids=ids).logits
        hidden = model.model(input_ids=ids[:1, :1]).last_hidden_state
        decode = model.lm_head(hidden)
    torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-6)  # widened exactly, summed in fp32
    exact = hidden.double() @ state["lm_head.weight"].double().t()
    magnitude = hidden.double().abs() @ state["lm_head.weight"].double().abs().t()
    assert float(((decode.double() - exact).abs() - 2 * 2.0**-8 * magnitude).max()) <= 0  # bf16 input
    saved = model.state_dict()
    assert saved.keys() == state.keys()
    assert torch.equal(saved["model.embed_tokens.weight"].float(), state["model.embed_tokens.weight"])
    memory = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in model.buffers()}
    assert model.lm_head.weight.dtype == torch.bfloat16 and sum(memory.values()) >= 300 * 64 * 2


def test_tied_head_is_left_alone_when_bf16_would_round_it():
    model = tied_model(exact_bf16=False)
    assert not keep_tied_head_in_bf16(model)
    assert isinstance(model.lm_head, torch.nn.Linear)



@needs_ort
def test_trained_salient_columns_reach_a_layer_whose_kernel_held_them(timings):
    """GIFT-SW writes trained salient columns back into a layer that an inference load had prepared
    (its fp16 copy dropped for the kernel's fp32 one): the write lands, and no kernel keeps the old ones."""
    from quikft.recovery.gift_linear import GiftLinear

    layer = exact_layer(4, 6, (48, 128), 64, True, bias=True)
    prepare_for_inference(layer, CPU, torch.float32, kernel="cpu-ort-int8")
    gift = GiftLinear.from_quik(layer)
    with torch.no_grad():
        gift.salient_weight.add_(0.5)
    trained = gift.salient_weight.detach().half()
    back = gift.to_quik()
    assert torch.equal(dict(back.named_buffers())["salient_weight"], trained)
    x = exact_input(2, 128)
    reference = exact_layer(4, 6, (48, 128), 64, True, bias=True)
    with torch.no_grad():
        reference.salient_weight.copy_(trained)
    reference.kernel = "cpu-ort-int8"
    assert torch.equal(back(x), reference(x))
