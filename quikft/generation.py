"""Text generation for quick checks of a (quantized) model."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def build_prompt_ids(tokenizer, prompt: str, chat: bool = True) -> torch.Tensor:
    """Token ids of ``prompt``, wrapped in the chat template when asked and available."""
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        return ids
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate: a continuation of ``prompt`` (wrapped in the chat template when ``chat`` and
    the tokenizer has one), greedy at temperature 0, sampled with ``seed`` otherwise."""

    prompt: str
    max_new_tokens: int = 64
    temperature: float = 0.0
    chat: bool = True
    seed: int = 0

    def check(self) -> None:
        """One-line errors for settings that cannot work, before a model is loaded."""
        if not self.prompt.strip():
            raise ValueError("the prompt is empty; give the text to continue")
        if self.max_new_tokens <= 0:
            raise ValueError(f"--max-new-tokens must be positive (got {self.max_new_tokens})")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"--temperature must be a finite number >= 0 (0 decodes greedily); got "
                             f"{self.temperature}")


@torch.inference_mode()
def generate_text(model, tokenizer, request: GenerationRequest) -> str:
    """The continuation ``request`` asks for, without the prompt."""
    request.check()
    torch.manual_seed(request.seed)
    ids = build_prompt_ids(tokenizer, request.prompt, request.chat).to(next(model.parameters()).device)
    greedy = request.temperature == 0
    sampling = {"do_sample": False} if greedy else {"do_sample": True, "temperature": request.temperature}
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=request.max_new_tokens,
                         pad_token_id=tokenizer.pad_token_id, **sampling)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
