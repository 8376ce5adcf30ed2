import math

import torch
import torch.nn.functional as F

from quikft.data import tokenize_stream
from quikft.eval import evaluate_ppl, window_starts


def test_window_starts_subsets():
    assert window_starts(1000, 100) == list(range(0, 1000, 100))
    assert window_starts(1050, 100, window_stride=8) == [0, 800]
    assert window_starts(1000, 100, max_windows=3) == [0, 100, 200]
    assert window_starts(99, 100) == []


def _hand_ppl(model, ids, seqlen, starts):
    nll, count = 0.0, 0
    with torch.no_grad():
        for s in starts:
            window = ids[s:s + seqlen].unsqueeze(0)
            logp = F.log_softmax(model(window).logits.float(), dim=-1)[0, :-1]
            nll -= logp.gather(1, window[0, 1:].unsqueeze(1)).sum().item()
            count += seqlen - 1
    return math.exp(nll / count)


def test_ppl_matches_a_hand_computation(tiny, text_file):
    model, tokenizer = tiny
    seqlen = 64
    result = evaluate_ppl(model, tokenizer, str(text_file), seqlen=seqlen, split="test", progress=False)
    ids = tokenize_stream(tokenizer, "\n\n".join(text_file.read_text().splitlines(keepends=True)),
                          add_special_tokens=True)
    starts = window_starts(ids.numel(), seqlen)
    assert result.windows == len(starts) == ids.numel() // seqlen
    assert result.tokens == len(starts) * (seqlen - 1)
    assert math.isclose(result.ppl, _hand_ppl(model, ids, seqlen, starts), rel_tol=1e-5)


def test_ppl_subset_uses_only_strided_windows(tiny, text_file):
    model, tokenizer = tiny
    full = evaluate_ppl(model, tokenizer, str(text_file), seqlen=32, progress=False)
    sub = evaluate_ppl(model, tokenizer, str(text_file), seqlen=32, window_stride=3, max_windows=2, progress=False)
    assert sub.windows == 2 and sub.total_windows == full.total_windows
    ids = tokenize_stream(tokenizer, "\n\n".join(text_file.read_text().splitlines(keepends=True)),
                          add_special_tokens=True)
    assert math.isclose(sub.ppl, _hand_ppl(model, ids, 32, [0, 96]), rel_tol=1e-5)


def test_seqlen_is_capped_at_the_model_context(tiny, text_file):
    model, tokenizer = tiny
    result = evaluate_ppl(model, tokenizer, str(text_file), seqlen=100_000, max_windows=1, progress=False)
    assert result.seqlen == model.config.max_position_embeddings
