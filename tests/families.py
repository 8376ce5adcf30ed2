"""Tiny random decoders of many families, built from configs (no hub access).

Each entry gives a transformers config class, the model class and the settings that make a
2-block model of hidden size 64 with the family's layout features switched on (sliding-window
layers, soft-capping, biases, parallel blocks, experts). Vocabulary and special tokens come from
the caller's tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

HIDDEN, LAYERS, HEADS = 64, 2, 4
ATTENTION = {"hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
             "max_position_embeddings": 256}


@dataclass(frozen=True)
class Family:
    name: str
    config: str  # transformers config class
    model: str  # transformers causal-LM class
    settings: dict = field(default_factory=dict)
    moe: bool = False
    # Projections of a block expected to read one input tensor (found by identity, not by name).
    shared: tuple[frozenset, ...] = ()


ATTN = frozenset({"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"})
GATE_UP = frozenset({"mlp.gate_proj", "mlp.up_proj"})
LLAMA_LIKE = (ATTN, GATE_UP)

FAMILIES = [
    Family("llama", "LlamaConfig", "LlamaForCausalLM", {"intermediate_size": 160, "num_key_value_heads": 2},
           shared=LLAMA_LIKE),
    Family("mistral", "MistralConfig", "MistralForCausalLM",
           {"intermediate_size": 160, "num_key_value_heads": 2, "sliding_window": 16}, shared=LLAMA_LIKE),
    Family("qwen2", "Qwen2Config", "Qwen2ForCausalLM",  # q/k/v with biases
           {"intermediate_size": 160, "num_key_value_heads": 2}, shared=LLAMA_LIKE),
    Family("qwen3", "Qwen3Config", "Qwen3ForCausalLM",
           {"intermediate_size": 160, "num_key_value_heads": 2, "head_dim": 16}, shared=LLAMA_LIKE),
    Family("gemma2", "Gemma2Config", "Gemma2ForCausalLM",  # sliding/global alternate, soft-capped logits
           {"intermediate_size": 160, "num_key_value_heads": 2, "head_dim": 16, "sliding_window": 16}, shared=LLAMA_LIKE),
    Family("gemma3", "Gemma3TextConfig", "Gemma3ForCausalLM",  # per-layer-type rotary tables and masks
           {"intermediate_size": 160, "num_key_value_heads": 2, "head_dim": 16, "sliding_window": 16,
            "layer_types": ["sliding_attention", "full_attention"]}, shared=LLAMA_LIKE),
    Family("phi3", "Phi3Config", "Phi3ForCausalLM",  # fused qkv_proj and gate_up_proj
           {"intermediate_size": 160, "num_key_value_heads": 2}),
    Family("opt", "OPTConfig", "OPTForCausalLM", {"ffn_dim": 160, "word_embed_proj_dim": HIDDEN}, shared=(ATTN,)),
    Family("gpt_neox", "GPTNeoXConfig", "GPTNeoXForCausalLM", {"intermediate_size": 160}),  # parallel residual
    Family("falcon", "FalconConfig", "FalconForCausalLM", {},  # attention and MLP read one layernorm output
           shared=(frozenset({"self_attention.query_key_value", "mlp.dense_h_to_4h"}),)),
    Family("mixtral", "MixtralConfig", "MixtralForCausalLM",
           {"intermediate_size": 96, "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2},
           moe=True, shared=(ATTN,)),
    Family("qwen2_moe", "Qwen2MoeConfig", "Qwen2MoeForCausalLM",
           {"intermediate_size": 160, "moe_intermediate_size": 48, "shared_expert_intermediate_size": 96,
            "num_key_value_heads": 2, "num_experts": 4, "num_experts_per_tok": 2}, moe=True,
           shared=(ATTN, frozenset({"mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"}))),
]
BY_NAME = {family.name: family for family in FAMILIES}


def build_family(family: Family | str, tokenizer, seed: int = 0, **changes):
    """A tiny random model of ``family`` in eval mode, its vocabulary sized for ``tokenizer``."""
    import transformers

    family = BY_NAME[family] if isinstance(family, str) else family
    settings = {**ATTENTION, **family.settings, **changes, "vocab_size": len(tokenizer),
                "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id}
    config = getattr(transformers, family.config)(**settings)
    torch.manual_seed(seed)
    return getattr(transformers, family.model)(config).eval()


# More families for the slow tests, built with AutoConfig.for_model(model_type, **settings): they
# check that discovery is generic (no entry in the adapter names them).
BASE_SETTINGS = {**ATTENTION, "num_key_value_heads": 2, "intermediate_size": 128}
EXTRA_FAMILIES = {
    "gpt2": {"n_embd": HIDDEN, "n_layer": LAYERS, "n_head": HEADS, "n_positions": 256},  # Conv1D projections
    "gpt_bigcode": {"n_embd": HIDDEN, "n_layer": LAYERS, "n_head": HEADS},
    "gptj": {"n_embd": HIDDEN, "n_layer": LAYERS, "n_head": HEADS, "n_positions": 256, "rotary_dim": 8},
    "codegen": {"n_embd": HIDDEN, "n_layer": LAYERS, "n_head": HEADS, "rotary_dim": 8},
    "bloom": {"n_layer": LAYERS, "n_head": HEADS},
    "mpt": {"d_model": HIDDEN, "n_layers": LAYERS, "n_heads": HEADS},
    "phi": {}, "stablelm": {}, "starcoder2": {}, "olmo": {}, "olmo2": {}, "cohere": {}, "granite": {},
    "gemma": {"head_dim": 16}, "persimmon": {}, "nemotron": {}, "xglm": {"d_model": HIDDEN, "num_layers": LAYERS,
                                                                         "attention_heads": HEADS, "ffn_dim": 128},
    "olmoe": {"num_experts": 4, "num_experts_per_tok": 2},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "head_dim": 16},
    "gpt_oss": {"num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 16,  # transposed, biased experts
                "layer_types": ["sliding_attention", "full_attention"]},
    "granitemoe": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "phimoe": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "minimax": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "deepseek_v3": {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                    "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1, "q_lora_rank": None,
                    "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
                    "n_shared_experts": 1},
    "glm4_moe": {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                 "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1},
    "jamba": {"num_experts": 4, "attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2,
              "expert_layer_offset": 1, "mamba_d_state": 8, "mamba_dt_rank": 8, "use_mamba_kernels": False},
}


def build_extra(model_type: str, tokenizer, seed: int = 0):
    """A tiny random model of one of :data:`EXTRA_FAMILIES`, in eval mode and float32."""
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = {**BASE_SETTINGS, **EXTRA_FAMILIES[model_type], "vocab_size": len(tokenizer),
                "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id}
    config = AutoConfig.for_model(model_type, **settings)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval().float()
