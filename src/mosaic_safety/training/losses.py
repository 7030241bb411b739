"""Losses on response tokens: refusal cross-entropy and the distribution-level KL (MOSAIC §2.2).

Both are averaged over a row's response tokens first, then over rows, so a long base answer does
not outweigh a short refusal template in the batch. ``first_weight`` optionally up-weights the first
response token, where the refuse-or-answer decision is made (1.0 = plain token mean, the paper's loss).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..logits import margin_over_rivals


def _row_mean(values: torch.Tensor, mask: torch.Tensor, first_weight: float = 1.0) -> torch.Tensor:
    weights = mask.to(values.dtype)
    if first_weight != 1.0:
        first = mask.to(torch.int8).argmax(-1)  # index of each row's first response token
        rows = torch.arange(mask.shape[0], device=mask.device)
        weights[rows, first] = weights[rows, first] * first_weight
    return (values * weights).sum(-1) / weights.sum(-1).clamp(min=1e-6)


def response_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, first_weight: float = 1.0
) -> torch.Tensor:
    """Per-row mean token cross-entropy; ``labels`` is -100 outside the response. Shape ``(B,)``."""
    mask = labels != -100
    ce = F.cross_entropy(logits.float().transpose(1, 2), labels.clamp(min=0), reduction="none")
    return _row_mean(ce, mask, first_weight)


def response_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    first_weight: float = 1.0,
) -> torch.Tensor:
    """Per-row mean of KL(p_teacher || p_student) over response positions. Shape ``(B,)``.

    Forward KL with the frozen base model as the target: the controlled model is pulled towards the
    whole next-token distribution of the base model, not only its argmax.
    """
    return _row_mean(token_kl(student_logits, teacher_logits), labels != -100, first_weight)


def response_reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    first_weight: float = 1.0,
) -> torch.Tensor:
    """Per-row mean of KL(p_student || p_teacher) over response positions. Shape ``(B,)``.

    The paper's forward KL is mass-covering: putting probability on a token the base model all but
    rules out (a refusal's first word on a neutral request) costs only the log of the mass taken
    from the base model's answer, about 0.2 nats to make a 0.2-probability refusal word greedy
    where the base distribution is flat. The reverse direction charges that mass at its
    log-ratio to the base probability, many nats for a word the base model never opens with, so it
    acts on exactly the over-refusal the forward term lets through.
    """
    return _row_mean(token_kl(teacher_logits, student_logits), labels != -100, first_weight)


def response_margin(
    logits: torch.Tensor, labels: torch.Tensor, margin: float, first_weight: float = 1.0
) -> torch.Tensor:
    """Per-row mean hinge ``relu(margin - (z_label - max_other z))`` over response positions. ``(B,)``.

    On a negative, ``labels`` is the base model's greedy answer, so a zero loss means greedy
    decoding under the policy keeps that answer token for token, with ``margin`` to spare. KL and
    CE are soft: where the base model's next-token distribution is flat, a small shift flips the
    greedy choice to a refusal at little cost in either (docs/experiments.md). The hinge is zero
    wherever the choice is safe and acts only where it is about to flip.
    """
    mask = labels != -100
    return _row_mean(F.relu(margin - margin_over_rivals(logits, labels)), mask, first_weight)


def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_teacher || p_student) at every position, ``(B, T)``: what ``response_kl`` averages."""
    student = F.log_softmax(student_logits.float(), dim=-1)
    teacher = F.log_softmax(teacher_logits.float(), dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1)


def block_overlap(blocks: list[torch.Tensor]) -> torch.Tensor:
    """Mean squared cosine between the mean vectors of different category blocks (0: orthogonal).

    Measured on SmolLM2, the blocks' mean vectors share one direction (cosine about 0.55), and
    projecting it out of every vector removes nearly all refusal (docs/experiments.md): the
    categories share one generic refusal switch. Penalising this overlap makes each category find
    its own vectors; measured, they are then no more selective, so the penalty is off by default.
    """
    if len(blocks) < 2:
        return torch.zeros(())
    means = F.normalize(torch.stack([b.mean(0) for b in blocks]), dim=-1)
    cos = means @ means.T
    pairs = torch.triu_indices(len(blocks), len(blocks), offset=1)
    return cos[pairs[0], pairs[1]].pow(2).mean()
