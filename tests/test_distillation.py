"""lifelong_moe.training.distillation: LwF's term on hand-made logits, value and gradient."""
import math

import pytest
import torch

from lifelong_moe.training.distillation import lwf_distillation


def test_lwf_distillation_equals_the_hand_computed_value_and_gradient():
    # Row 0: teacher logits (2 ln 3, 0) / T=2 -> p = (3/4, 1/4); student (0, 0) -> q = (1/2, 1/2):
    #   KL(p || q) = 3/4 ln(3/2) + 1/4 ln(1/2), T^2 KL = ln(27/16). Row 1: equal distributions, KL = 0.
    student = torch.tensor([[0.0, 0.0], [1.0, 1.0]], requires_grad=True)
    teacher = torch.tensor([[2 * math.log(3), 0.0], [5.0, 5.0]])
    loss = lwf_distillation(student, teacher, temperature=2.0, weight=1.5)
    assert loss.item() == pytest.approx(1.5 * math.log(27 / 16) / 2, rel=1e-6)  # batch mean over 2 rows
    loss.backward()
    # d/dz (weight T^2 KL / N) = weight (T / N) (q - p); row 0: 1.5 * (2 / 2) * (1/2 - 3/4, 1/2 - 1/4)
    assert torch.allclose(student.grad, torch.tensor([[-0.375, 0.375], [0.0, 0.0]]), atol=1e-6, rtol=0)


def test_lwf_distillation_runs_in_fp32_and_weight_zero_is_zero():
    student = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.bfloat16)
    teacher = torch.tensor([[1.5, 0.25, -2.0]], dtype=torch.bfloat16)
    loss = lwf_distillation(student, teacher, temperature=2.0)
    assert loss.dtype == torch.float32 and torch.equal(loss, lwf_distillation(student.float(), teacher.float(), 2.0))
    assert lwf_distillation(student, teacher, 2.0, weight=0.0).item() == 0.0
