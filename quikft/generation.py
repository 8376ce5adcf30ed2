"""Text generation for quick checks of a (quantized) model."""

from __future__ import annotations

import math

import torch


def build_prompt_ids(tokenizer, prompt: str, chat: bool = True) -> torch.Tensor:
    """Token ids of ``prompt``, wrapped in the chat template when asked and available."""
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        return ids
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


def check_generation(prompt: str, max_new_tokens: int, temperature: float) -> None:
    """One-line errors for generation settings that cannot work, before a model is loaded."""
    if not prompt.strip():
        raise ValueError("the prompt is empty; give the text to continue")
    if max_new_tokens <= 0:
        raise ValueError(f"--max-new-tokens must be positive (got {max_new_tokens})")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"--temperature must be a finite number >= 0 (0 decodes greedily); got {temperature}")


@torch.inference_mode()
def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
                  chat: bool = True, seed: int = 0) -> str:
    """Greedy (temperature 0) or sampled continuation of ``prompt``, without the prompt."""
    check_generation(prompt, max_new_tokens, temperature)
    torch.manual_seed(seed)
    ids = build_prompt_ids(tokenizer, prompt, chat).to(next(model.parameters()).device)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         pad_token_id=tokenizer.pad_token_id, **sampling)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
