"""Evaluation: the paper-protocol perplexity (zero-shot tasks come later)."""

from quikft.eval.ppl import PplResult, evaluate_ppl, perplexity_of_ids, window_starts

__all__ = ["PplResult", "evaluate_ppl", "perplexity_of_ids", "window_starts"]
