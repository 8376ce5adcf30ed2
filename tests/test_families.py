"""Every decoder family of issue 11 through the whole path, on tiny random models built from configs:
quantize -> packed save -> quikft.load and from_pretrained (equal logits) -> eval -> 2-step post recovery.
"""

import copy
import json
import math

import pytest
import torch
from families import EXTRA_FAMILIES, FAMILIES, build_extra, build_family
from safetensors.torch import load_file

from quikft import arch
from quikft.checkpoint import load, save_packed
from quikft.config import QuantConfig
from quikft.data import calibration_windows
from quikft.eval.ppl import evaluate_ppl
from quikft.nn import QuikLinear
from quikft.quant.model import quantize_model
from quikft.recovery import RecoverConfig, recover

pytestmark = pytest.mark.usefixtures("exact_kernels")


def _config(**changes):
    settings = dict(bits=3, salient=8, group_size=32, nsamples=8, seqlen=32, clip_search=False, expert_min_tokens=4,
                    dtype_rest="fp32")
    return QuantConfig(**{**settings, **changes})


def _quantize(model, calib, config):
    return quantize_model(model, calib, config, progress=False, device="cpu", batch_size=4)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_family_goes_through_quantize_load_eval_and_recovery(family, tokenizer, text_corpus, tmp_path, single_thread):
    from transformers import AutoModelForCausalLM

    model = build_family(family, tokenizer)
    fp = copy.deepcopy(model)
    config = _config()
    calib = calibration_windows(tokenizer, str(text_corpus), config.nsamples, config.seqlen, 0)
    quantized = _quantize(model, calib, config)
    layout = arch.layout(fp)

    # every projection of every block is quantized; routers and gates are not
    expected = len(layout) * len(arch.layout(model).layers(0))
    assert len(quantized.results) == expected and expected > 0
    assert not any(name.rsplit(".", 1)[-1] == "gate" or name.endswith("shared_expert_gate")
                   for name in quantized.results)
    found = {frozenset(group) for group in quantized.input_groups[layout.block_name(0)]}
    assert found == set(family.shared)
    if family.moe:
        experts = quantized.experts
        assert len(experts) == len(layout)
        n_experts = arch.layout(model).experts(0)[experts[0].split(".", 3)[-1]].n_experts
        for name in experts:
            per_expert = [n for n in quantized.results if n.startswith(f"{name}.")]
            assert len(per_expert) == 2 * n_experts  # the input and output projection of every expert

    # packed save -> quikft.load and from_pretrained give equal logits, close to the fake-quant model
    out = save_packed(model, tokenizer, quantized, tmp_path / "packed", config)
    ids = calib[:2]
    ours, theirs = load(out, dtype=torch.float32), AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(_logits(ours, ids), _logits(theirs, ids))
    fake = copy.deepcopy(model)
    arch.fuse_all_experts(fake)  # the family's own experts forward on the fake-quantized weights
    assert torch.allclose(_logits(ours, ids), _logits(fake, ids), atol=1e-4, rtol=1e-4)
    assert sum(isinstance(m, QuikLinear) for m in ours.modules()) == expected

    # eval: the chunked head path reproduces the family's logits (soft-capping included)
    assert arch.head_path_matches(ours, ids)
    ppl = evaluate_ppl(ours, tokenizer, str(text_corpus), seqlen=32, max_windows=2, progress=False)
    assert math.isfinite(ppl.ppl)

    # 2-step post recovery: salient columns change, codes stay bit-identical, output loads
    report = recover(RecoverConfig(model=str(out), mode="post", data=(str(text_corpus),), steps=2, batch_size=2,
                                   seqlen=32, lr=1e-3, eval_windows=0, bf16=False, device="cpu",
                                   out=str(tmp_path / "recovered")), progress=False)
    before, after = load_file(out / "model.safetensors"), load_file(tmp_path / "recovered" / "model.safetensors")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before if k.endswith(".qweight"))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith(".salient_weight"))
    assert torch.equal(_logits(load(report["out"], dtype=torch.float32), ids),
                       _logits(AutoModelForCausalLM.from_pretrained(report["out"]), ids))


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_gptq_beats_rtn_on_the_family_layers(family, tokenizer, text_corpus, single_thread):
    """Block 0 sees the same full-precision inputs under both methods, so its layer losses compare."""
    model = build_family(family, tokenizer)
    calib = calibration_windows(tokenizer, str(text_corpus), 8, 32, 0)
    losses = {}
    for method in ("gptq", "rtn"):
        config = _config(method=method, targets=(f"{arch.layout(model).block_name(0)}.*",))
        result = _quantize(copy.deepcopy(model), calib, config)
        losses[method] = {layer.name: layer.loss for layer in result.layers}
    assert losses["gptq"].keys() == losses["rtn"].keys()
    wins = [losses["gptq"][name] < losses["rtn"][name] for name in losses["gptq"]]
    assert sum(losses["gptq"].values()) < sum(losses["rtn"].values())
    assert sum(wins) >= 0.9 * len(wins), losses


def _never_route_to(expert: int):
    """A router hook that sends no token to ``expert`` (its slot goes to another free expert)."""
    def hook(_module, _args, out):
        logits, weights, index = out
        index = index.clone()
        for slot in range(index.shape[1]):
            taken = index[:, [s for s in range(index.shape[1]) if s != slot]]
            free = next(e for e in range(logits.shape[1]) if e != expert and not bool((taken == e).all()))
            index[:, slot] = torch.where(index[:, slot] == expert, free, index[:, slot])
        return logits, weights, index
    return hook


def test_starved_experts_take_statistics_from_all_tokens_and_are_listed(tokenizer, text_corpus):
    model = build_family("mixtral", tokenizer)
    model.model.layers[0].mlp.gate.register_forward_hook(_never_route_to(3))
    calib = calibration_windows(tokenizer, str(text_corpus), 8, 32, 0)
    quantized = _quantize(model, calib, _config(expert_min_tokens=20))
    starved = {entry["name"]: entry for entry in quantized.starved()}
    never = "model.layers.0.mlp.experts.gate_up_proj.3"
    assert starved[never] == {"name": never, "tokens": 0, "statistics": "all-tokens"}
    assert "model.layers.0.mlp.experts.down_proj.3" in starved
    assert all(entry["tokens"] < 20 for entry in starved.values())
    layers = {layer.name: layer for layer in quantized.layers}
    assert all(layer.tokens >= 20 for name, layer in layers.items() if name not in starved and ".experts." in name)
    assert math.isfinite(layers[never].loss) and layers[never].salient == 8
    # all tokens entering the MoE layer: 8 windows of 32 tokens
    assert quantized.results[never].codes.shape == (2 * 96, 64)


class _ListExpertsMoe(torch.nn.Module):
    """The older layout: an ``nn.Linear`` router and an ``nn.ModuleList`` of expert MLPs (top-2)."""

    def __init__(self, hidden: int, intermediate: int, n_experts: int, never: int | None = None):
        super().__init__()
        self.gate = torch.nn.Linear(hidden, n_experts, bias=False)
        self.experts = torch.nn.ModuleList(torch.nn.ModuleDict(
            {"w1": torch.nn.Linear(hidden, intermediate, bias=False), "w3": torch.nn.Linear(hidden, intermediate, bias=False),
             "w2": torch.nn.Linear(intermediate, hidden, bias=False)}) for _ in range(n_experts))
        self.never = never

    def forward(self, hidden):
        x = hidden.reshape(-1, hidden.shape[-1])
        logits = self.gate(x)
        if self.never is not None:
            logits[:, self.never] = -torch.inf
        weights, index = torch.topk(logits.softmax(-1), 2, dim=-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(index == e)
            if token.numel():
                h = x[token]
                y = expert["w2"](torch.nn.functional.silu(expert["w1"](h)) * expert["w3"](h))
                out.index_add_(0, token, y * weights[token, slot, None])
        return out.reshape(hidden.shape)


def test_list_of_expert_mlps_works_through_generic_discovery(tokenizer, text_corpus):
    model = build_family("llama", tokenizer)
    for block in model.model.layers:
        block.mlp = _ListExpertsMoe(64, 48, 4, never=2)
    calib = calibration_windows(tokenizer, str(text_corpus), 8, 32, 0)
    quantized = _quantize(model, calib, _config())
    names = set(quantized.results)
    assert "model.layers.0.mlp.gate" not in names  # the router stays in full precision
    assert {f"model.layers.0.mlp.experts.{e}.{w}" for e in range(4) for w in ("w1", "w2", "w3")} <= names
    groups = {frozenset(group) for group in quantized.input_groups["model.layers.0"]}
    assert frozenset({"mlp.experts.0.w1", "mlp.experts.0.w3"}) in groups  # one expert's w1/w3 read one tensor
    never = {entry["name"]: entry for entry in quantized.starved()}
    assert never["model.layers.0.mlp.experts.2.w1"] == {"name": "model.layers.0.mlp.experts.2.w1", "tokens": 0,
                                                        "statistics": "none"}
    layers = {layer.name: layer for layer in quantized.layers}
    assert math.isfinite(layers["model.layers.0.mlp.experts.2.w2"].loss)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(EXTRA_FAMILIES))
def test_more_families_quantize_and_load(model_type, tokenizer, text_corpus, tmp_path, single_thread):
    """Families no module of quikft names: discovery, experts and loading must be generic."""
    from transformers import AutoModelForCausalLM

    model = build_extra(model_type, tokenizer)
    config = _config()
    calib = calibration_windows(tokenizer, str(text_corpus), config.nsamples, config.seqlen, 0)
    quantized = _quantize(model, calib, config)
    assert len(quantized.results) == sum(len(arch.layout(model).layers(i)) for i in range(len(arch.layout(model))))
    out = save_packed(model, tokenizer, quantized, tmp_path / "packed", config)
    ours, theirs = load(out, dtype=torch.float32), AutoModelForCausalLM.from_pretrained(out)
    ids = calib[:2]
    assert torch.equal(_logits(ours, ids), _logits(theirs, ids))
    fake = copy.deepcopy(model)
    arch.fuse_all_experts(fake)
    assert torch.allclose(_logits(ours, ids), _logits(fake, ids), atol=1e-4, rtol=1e-4)
    assert sum(isinstance(m, QuikLinear) for m in ours.modules()) == len(quantized.results)


def test_refused_family_gets_one_line_before_any_work(tokenizer):
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    config = Llama4TextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=64,
                              intermediate_size_mlp=96, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16, num_local_experts=2)
    model = Llama4ForCausalLM(config)
    with pytest.raises(arch.UnsupportedArchitectureError) as err:
        arch.check_supported(model)
    assert "\n" not in str(err.value) and "llama4_text" in str(err.value)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_quantized_lm_head_is_untied_and_uses_final_norm_statistics(family, tokenizer, text_corpus, tmp_path):
    from transformers import AutoModelForCausalLM

    from quikft.quant.gptq import hessian_objective

    model = build_family(family, tokenizer, tie_word_embeddings=True)
    assert arch.head_is_tied(model)
    embedding = model.get_input_embeddings().weight.detach().clone()
    config = _config(quantize_lm_head=True)
    calib = calibration_windows(tokenizer, str(text_corpus), config.nsamples, config.seqlen, 0)
    original_head = model.get_output_embeddings().weight.detach().clone()
    quantized = _quantize(model, calib, config)
    assert quantized.head == "lm_head" and quantized.untied_head and not arch.head_is_tied(model)
    assert torch.equal(model.get_input_embeddings().weight, embedding)  # the embedding stays full precision

    # the head's Hessian is that of its real inputs: the final norm of the (quantized) last block's outputs
    inputs = []
    handle = model.lm_head.register_forward_hook(lambda m, a, o: inputs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for start in range(0, calib.shape[0], 4):  # the batches _quantize ran
            model(input_ids=calib[start:start + 4])
    handle.remove()
    x = torch.cat(inputs).double()
    hessian = (2 * x.T @ x / x.shape[0]).float()
    result = quantized.results["lm_head"]
    assert result.loss == pytest.approx(hessian_objective(result.weight - original_head, hessian), rel=1e-4)

    out = save_packed(model, tokenizer, quantized, tmp_path / "packed", config)
    saved = json.loads((out / "config.json").read_text())
    assert saved["tie_word_embeddings"] is False and "lm_head" in saved["quantization_config"]["modules"]
    ours, theirs = load(out, dtype=torch.float32), AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(ours.lm_head, QuikLinear) and isinstance(theirs.lm_head, QuikLinear)
    assert torch.equal(ours.get_input_embeddings().weight, embedding)
    ids = calib[:2]
    assert torch.equal(_logits(ours, ids), _logits(theirs, ids))
    assert torch.allclose(_logits(ours, ids), _logits(model, ids), atol=1e-4, rtol=1e-4)
