"""The recovery training losses (``--loss``), computed on the labelled positions only.

:class:`Loss` names the choices (cross-entropy or distillation from a teacher); the CLI's
``--loss`` and the config's check come from it. ``quikft recover`` trains on rows whose prompt
tokens carry no label (instruction data: loss on responses only), so the head's logits are needed
only where a label is. :class:`TrainingObjective` runs the decoder once, keeps the final hidden
states of the labelled positions and evaluates the head over them in chunks of rows, forming the
gradient with respect to those hidden states in the same pass (:class:`HeadLoss`); no full (tokens
x vocabulary) logits tensor, fp32 copy of it or log-softmax backward over every token is ever
built. With ``--loss kd`` the teacher's head runs over the same positions, chunk by chunk, without
gradient.

The sums equal the plain formulas up to float rounding:

- cross-entropy: Σ_t [logsumexp(z_t) - z_t[y_t]],   ∂/∂z_t = softmax(z_t) - onehot(y_t)
- KD: T²·Σ_t KL(softmax(u_t/T) ‖ softmax(z_t/T)),   ∂/∂z_t = T·(softmax(z_t/T) - softmax(u_t/T))

with z the student's and u the teacher's logits. The hidden-state path is taken only after a
check on the model itself that ``head(decoder(ids))`` reproduces its logits (models that scale or
soft-cap their logits in forward fail it); otherwise the objective falls back to the model's own
logits, still restricted to the labelled positions.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quikft.config import Choice
from quikft.recovery.data import IGNORE

# Rows of logits per chunk: chunk x vocabulary fp32 values stay near this many elements (32 MiB).
# On the default model (vocabulary 49152, 170 rows) 128-341 rows ran the head's loss and gradient
# over 1490 positions in 1.38-1.45 s at one thread, 32 rows in 2.15 s and 745 rows in 1.98 s.
CHUNK_ELEMENTS = 1 << 23


class Loss(Choice):
    """The training loss; the values are the ``--loss`` names."""

    CE = "ce"
    KD = "kd"

    @property
    def help(self) -> str:
        """What the loss is, for the CLI's help."""
        return {Loss.CE: "cross-entropy on responses/text", Loss.KD: "KL to the FP teacher's logits"}[self]

    @property
    def needs_teacher(self) -> bool:
        """Whether the run loads a full-precision teacher (:class:`Distillation`)."""
        return self is Loss.KD


@dataclass(frozen=True)
class Distillation:
    """``--loss kd``: the frozen full-precision teacher and the softmax temperature T."""

    teacher: nn.Module
    temperature: float = 1.0


def chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(vocab, 1))


def _logits(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return F.linear(hidden.to(weight.dtype), weight, bias).float()


@dataclass(frozen=True)
class TokenTargets:
    """Cross-entropy targets: the labelled next token of each position."""

    tokens: Tensor

    def chunk(self, rows: slice, logits: Tensor) -> tuple[Tensor, Tensor]:
        """The summed loss of the positions ``rows`` (whose student logits are ``logits``) and its gradient."""
        return _ce_chunk(logits, self.tokens[rows])


@dataclass(frozen=True)
class TeacherTargets:
    """Distillation targets: the teacher's final hidden states at the same positions, its head in the
    compute dtype, and the temperature."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None
    temperature: float

    def chunk(self, rows: slice, logits: Tensor) -> tuple[Tensor, Tensor]:
        """The T²-scaled KL of the positions ``rows`` (whose student logits are ``logits``) and its gradient."""
        teacher = _logits(self.hidden[rows], self.weight, self.bias)
        return _kd_chunk(logits, teacher, self.temperature)


class HeadLoss(torch.autograd.Function):
    """Summed CE (:class:`TokenTargets`) or T²-scaled KL to a teacher (:class:`TeacherTargets`) of
    ``hidden`` through a frozen head.

    ``hidden`` (N, H) are the labelled positions' final hidden states, ``weight``/``bias`` the
    head in the compute dtype (no gradient). The gradient with respect to ``hidden`` is formed in
    the forward, chunk by chunk, and only scaled in the backward, so no logits are kept.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None,
                targets: TokenTargets | TeacherTargets) -> Tensor:
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device)
        step = chunk_rows(weight.shape[0])
        for start in range(0, hidden.shape[0], step):
            rows = slice(start, start + step)
            loss, dlogits = targets.chunk(rows, _logits(hidden[rows], weight, bias))
            total += loss
            grad[rows] = (dlogits.to(weight.dtype) @ weight).float()
        ctx.save_for_backward(grad)
        ctx.hidden_dtype = hidden.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (grad,) = ctx.saved_tensors
        return (grad * grad_output).to(ctx.hidden_dtype), None, None, None


def _ce_chunk(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy of a chunk and its gradient with respect to the logits."""
    log_probs = torch.log_softmax(logits, dim=-1)  # one fused pass; logsumexp is three
    loss = -log_probs.gather(1, targets[:, None]).sum()
    probs = log_probs.exp_()
    probs[torch.arange(targets.numel(), device=targets.device), targets] -= 1.0
    return loss, probs


def _kd_chunk(logits: Tensor, teacher: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """T²·Σ KL(teacher ‖ student) of a chunk at ``temperature``, and its gradient w.r.t. the student logits."""
    log_student = F.log_softmax(logits.div_(temperature), dim=-1)
    log_teacher = F.log_softmax(teacher.div_(temperature), dim=-1)
    teacher_probs = log_teacher.exp()
    loss = (teacher_probs * (log_teacher - log_student)).sum() * temperature ** 2
    return loss, log_student.exp_().sub_(teacher_probs).mul_(temperature)


def labelled_positions(labels: Tensor) -> tuple[Tensor, Tensor]:
    """The (row, position) mask of positions that predict a labelled next token, and those tokens."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE
    return keep, labels[:, 1:][keep[:, :-1]]


class CausalLMHead:
    """A causal LM seen as decoder + output head, when that reproduces the model's own logits."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.decoder = model.get_decoder()
        self.head = model.get_output_embeddings()
        self._cast: tuple[tuple, tuple[Tensor, Tensor | None]] | None = None

    def hidden(self, input_ids: Tensor) -> Tensor:
        return self.decoder(input_ids=input_ids, use_cache=False).last_hidden_state

    def weights(self, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
        """The frozen head's weight and bias in ``dtype``, cast once (the cast of the default model's
        49152 x 576 head to bf16 took 0.37 s a step) and again only when the weight changes."""
        weight, bias = self.head.weight, self.head.bias
        key = (dtype, weight.data_ptr(), weight.device, weight._version)
        if self._cast is None or self._cast[0] != key:
            self._cast = key, (weight.detach().to(dtype), None if bias is None else bias.detach().to(dtype))
        return self._cast[1]

    @classmethod
    def of(cls, model: nn.Module, input_ids: Tensor) -> CausalLMHead | None:
        """The split of ``model``, or None when its logits are not ``head(decoder(ids))`` (checked on
        the first tokens of ``input_ids`` in eval mode, without noise or gradient)."""
        head = getattr(model, "get_output_embeddings", lambda: None)()
        if not isinstance(head, nn.Linear) or head.weight.requires_grad or (
                head.bias is not None and head.bias.requires_grad):
            return None
        try:
            split = cls(model)
        except (AttributeError, NotImplementedError):
            return None
        was_training = model.training
        ids = input_ids[:1, :16]
        model.eval()
        try:
            with torch.no_grad():
                expected = model(input_ids=ids, use_cache=False).logits.float()
                weight, bias = split.weights(torch.float32)
                got = F.linear(split.hidden(ids).float(), weight, bias)
        except (TypeError, AttributeError):
            return None
        finally:
            model.train(was_training)
        same = got.shape == expected.shape and torch.allclose(got, expected, rtol=1e-4, atol=1e-4)
        return split if same else None


class TrainingObjective(nn.Module):
    """``forward(input_ids, labels)`` = the summed training loss over the labelled positions.

    A module, so that a data-parallel wrapper (DDP) runs the whole loss in its forward. The
    teacher (``distillation``, for ``--loss kd``; else cross-entropy) is held outside the module
    tree: it is never trained, moved or broadcast with it. ``split_head=False`` always takes the
    model's own logits (an FSDP2-sharded model gathers its embedding and head only inside its own
    forward).
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype, sample_ids: Tensor,
                 distillation: Distillation | None = None, split_head: bool = True) -> None:
        super().__init__()
        self.model = model
        self.dtype = dtype
        self.temperature = 1.0 if distillation is None else distillation.temperature
        self.student = CausalLMHead.of(model, sample_ids) if split_head else None
        teacher = None if distillation is None else distillation.teacher
        self._teacher = (teacher, None if teacher is None or not split_head else CausalLMHead.of(teacher, sample_ids))

    @property
    def fused(self) -> bool:
        """Whether the head runs only on labelled positions from hidden states (else the model's logits)."""
        teacher, teacher_head = self._teacher
        return self.student is not None and (teacher is None or teacher_head is not None)

    def autocast(self, device_type: str):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.dtype)

    def forward(self, input_ids: Tensor, labels: Tensor) -> Tensor:
        keep, targets = labelled_positions(labels)
        teacher, teacher_head = self._teacher
        with self.autocast(input_ids.device.type):
            if not self.fused:
                return self._from_logits(input_ids, keep, targets)
            hidden = self.student.hidden(input_ids)[keep]
            weight, bias = self.student.weights(self.dtype)
            if teacher is None:
                return HeadLoss.apply(hidden, weight, bias, TokenTargets(targets))
            with torch.no_grad():
                teacher_hidden = teacher_head.hidden(input_ids)[keep]
            teacher_weight, teacher_bias = teacher_head.weights(self.dtype)
            return HeadLoss.apply(hidden, weight, bias,
                                  TeacherTargets(teacher_hidden, teacher_weight, teacher_bias, self.temperature))

    def _from_logits(self, input_ids: Tensor, keep: Tensor, targets: Tensor) -> Tensor:
        """The same sums from the models' full logits (models whose head is not a plain linear)."""
        logits = self.model(input_ids=input_ids, use_cache=False).logits[keep].float()
        teacher, _ = self._teacher
        if teacher is None:
            return F.cross_entropy(logits, targets, reduction="sum")
        with torch.no_grad():
            target = teacher(input_ids=input_ids, use_cache=False).logits[keep].float()
        t = self.temperature
        return F.kl_div(F.log_softmax(logits / t, -1), F.log_softmax(target / t, -1), log_target=True,
                        reduction="sum") * t ** 2
