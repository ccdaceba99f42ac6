"""Distillation terms added to a strategy's training loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def lwf_distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                     weight: float = 1.0) -> torch.Tensor:
    """Learning without Forgetting's old-task term (Li & Hoiem, TPAMI 2017, Eq. 2-3) on logits
    [N, C] (a row per sample or per answer position), in fp32:

        weight * T^2 * (1/N) sum_n KL( softmax(teacher_n / T) || softmax(student_n / T) ).

    Eq. 2 is the cross-entropy from the teacher's recorded probabilities to the student's, both raised
    to 1/T and renormalised (Eq. 3), which is the softmax of the logits / T; the KL divergence differs
    from it by the teacher's entropy alone (no gradient reaches the teacher), so the gradient is
    theirs. ``weight`` is their lambda_o; the T^2 factor (Hinton et al., 2015) keeps the gradient's
    scale independent of T, as in the ZSCL line of work."""
    target = F.softmax(teacher.float() / temperature, dim=-1)
    log_p = F.log_softmax(student.float() / temperature, dim=-1)
    return weight * temperature ** 2 * F.kl_div(log_p, target, reduction="batchmean")
