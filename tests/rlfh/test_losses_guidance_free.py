"""guidance-free distillation's teacher and loss (rlfh/losses/guidance_free.py) on worked numbers."""

import pytest
import torch

from rlfh.losses.guidance_free import guidance_free_loss, guided_teacher


def test_teacher_is_the_guided_prediction_worked_numbers():
    cond = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    uncond = torch.tensor([[0.5, 1.0], [1.0, -1.0]])
    # u + 5 (c - u): [0.5 + 2.5, 1 + 5], [1 - 5, -1 + 0]
    torch.testing.assert_close(guided_teacher(cond, uncond, 5.0), torch.tensor([[3.0, 6.0], [-4.0, -1.0]]))
    torch.testing.assert_close(guided_teacher(cond, uncond, 1.0), cond)  # guidance 1 is the conditional model
    torch.testing.assert_close(guided_teacher(cond, uncond, 0.0), uncond)


def test_loss_worked_numbers_and_gradient_only_to_the_student():
    pred = torch.tensor([[3.0, 4.0], [0.0, 0.0]], requires_grad=True)
    teacher = torch.tensor([[3.0, 6.0], [-4.0, -1.0]], requires_grad=True)
    loss = guidance_free_loss(pred, teacher, 0.5)
    # per-sample means: (0 + 4) / 2 = 2 and (16 + 1) / 2 = 8.5; batch mean 5.25; times 0.5
    assert float(loss) == pytest.approx(2.625)
    loss.backward()
    assert teacher.grad is None  # the teacher is a target
    torch.testing.assert_close(pred.grad, 0.5 * 2 * (pred.detach() - teacher.detach()) / 4)


def test_shapes_must_match():
    with pytest.raises(ValueError, match="differ in shape"):
        guided_teacher(torch.zeros(2, 3), torch.zeros(2, 4), 5.0)
    with pytest.raises(ValueError, match="differ in shape"):
        guidance_free_loss(torch.zeros(2, 3), torch.zeros(3, 3), 1.0)
