"""The recovery losses on labelled positions: sums and gradients equal the plain formulas, chunked or not."""

import pytest
import torch
import torch.nn.functional as F

from quikft.recovery import loss as train_loss
from quikft.recovery.data import IGNORE
from quikft.recovery.loss import (
    CausalLMHead,
    Distillation,
    HeadLoss,
    TeacherTargets,
    TokenTargets,
    TrainingObjective,
    labelled_positions,
)


def _head(vocab=50, hidden=12, seed=0, bias=True):
    torch.manual_seed(seed)
    return torch.randn(vocab, hidden) / 3, (torch.randn(vocab) if bias else None)


@pytest.mark.parametrize("chunk_elements", [1 << 24, 50 * 3])  # one chunk; chunks of 3 rows
def test_head_loss_ce_equals_cross_entropy_and_its_gradient(monkeypatch, chunk_elements):
    monkeypatch.setattr(train_loss, "CHUNK_ELEMENTS", chunk_elements)
    weight, bias = _head()
    hidden = torch.randn(10, 12, requires_grad=True)
    targets = torch.randint(0, 50, (10,))
    got = HeadLoss.apply(hidden, weight, bias, TokenTargets(targets))
    (got * 2).backward()
    reference_hidden = hidden.detach().clone().requires_grad_(True)
    expected = F.cross_entropy(F.linear(reference_hidden, weight, bias), targets, reduction="sum")
    (expected * 2).backward()
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(hidden.grad, reference_hidden.grad)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_head_loss_kd_equals_scaled_kl_and_its_gradient(monkeypatch, temperature):
    monkeypatch.setattr(train_loss, "CHUNK_ELEMENTS", 50 * 4)
    weight, bias = _head()
    teacher_weight, _ = _head(hidden=8, seed=1)
    hidden = torch.randn(9, 12, requires_grad=True)
    teacher_hidden = torch.randn(9, 8)
    got = HeadLoss.apply(hidden, weight, bias, TeacherTargets(teacher_hidden, teacher_weight, None, temperature))
    got.backward()
    reference_hidden = hidden.detach().clone().requires_grad_(True)
    student = F.linear(reference_hidden, weight, bias) / temperature
    teacher = F.linear(teacher_hidden, teacher_weight) / temperature
    expected = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True,
                        reduction="sum") * temperature ** 2
    expected.backward()
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(hidden.grad, reference_hidden.grad)


def test_labelled_positions_predict_the_next_labelled_token():
    labels = torch.tensor([[5, IGNORE, 7, 8], [IGNORE, IGNORE, IGNORE, 9]])
    keep, targets = labelled_positions(labels)
    assert keep.tolist() == [[False, True, True, False], [False, False, True, False]]
    assert targets.tolist() == [7, 8, 9]


def _batch(vocab, seed=0):
    torch.manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 20))
    labels = ids.clone()
    labels[0, :8] = IGNORE  # a prompt
    labels[2] = IGNORE  # a row without labels
    return ids, labels


@pytest.mark.parametrize("kd", [False, True])
def test_objective_equals_the_full_logits_loss_and_gradient(tiny, kd, monkeypatch):
    from quikft.models import load_model

    model, tokenizer = tiny
    teacher = None
    if kd:
        teacher = load_model(str(model.name_or_path))[0].requires_grad_(False)
        with torch.no_grad():
            for p in teacher.parameters():
                p.add_(0.01 * torch.randn_like(p))
    model.requires_grad_(False)
    trained = model.model.layers[0].mlp.down_proj.weight
    trained.requires_grad_(True)
    ids, labels = _batch(len(tokenizer))
    monkeypatch.setattr(train_loss, "CHUNK_ELEMENTS", 7 * len(tokenizer))
    objective = TrainingObjective(model, torch.float32, ids, None if teacher is None else Distillation(teacher, 1.5))
    assert objective.fused
    fused = objective(ids, labels)
    fused.backward()
    fused_grad, trained.grad = trained.grad.clone(), None
    objective.student = None  # force the full-logits path
    plain = objective(ids, labels)
    plain.backward()
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused_grad, trained.grad, rtol=1e-4, atol=1e-6)
    if not kd:
        logits = model(input_ids=ids).logits
        reference = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE,
                                    reduction="sum")
        torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)


def test_a_model_whose_logits_are_not_head_of_hidden_uses_its_own_logits(tiny):
    model, tokenizer = tiny
    ids, labels = _batch(len(tokenizer))
    original = type(model).forward

    class Capped(type(model)):
        def forward(self, *args, **kwargs):  # soft-capped logits, as some families do
            out = original(self, *args, **kwargs)
            out.logits = 3.0 * torch.tanh(out.logits / 3.0)
            return out

    model.__class__ = Capped
    assert CausalLMHead.of(model, ids) is None
    objective = TrainingObjective(model, torch.float32, ids)
    assert not objective.fused
    keep, targets = labelled_positions(labels)
    with torch.no_grad():
        expected = F.cross_entropy(model(input_ids=ids).logits[keep], targets, reduction="sum")
        torch.testing.assert_close(objective(ids, labels), expected)
