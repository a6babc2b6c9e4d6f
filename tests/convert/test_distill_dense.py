"""gblr.convert.distill with a dense student: no structured layers, possibly fewer layers."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_bert

from gblr.convert.distill import _matching_depths, distill

IDS = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))


def _batches(n):
    return ({"input_ids": IDS, "attention_mask": torch.ones_like(IDS)} for _ in range(n))


@pytest.mark.parametrize("loss", ["hidden", "both"])
def test_distill_a_dense_student_with_a_layer_dropped(loss):
    teacher = tiny_bert()
    student = tiny_bert(seed=1)  # unlike the teacher, so that there is something to learn
    student.encoder.layer = torch.nn.ModuleList([student.encoder.layer[1]])
    student.config.num_hidden_layers = 1
    before = student.encoder.layer[0].output.dense.weight.detach().clone()
    result = distill(student, teacher, _batches(10), steps=10, loss=loss, lr=3e-3,
                     progress=False)
    assert result.steps == 10 and result.cost == result.dense_cost == 0
    assert sum(result.losses[-2:]) < sum(result.losses[:2])
    assert not torch.equal(student.encoder.layer[0].output.dense.weight, before)
    with pytest.raises(ValueError, match="no structured layers"):
        distill(student, teacher, _batches(1), steps=1, budget=0.5, progress=False)
    with pytest.raises(ValueError, match="fewer layers than its teacher"):
        distill(tiny_bert(seed=2), student, _batches(1), steps=1, loss="hidden",
                progress=False)


def test_matching_depths_are_evenly_spaced_and_end_at_the_last():
    states = list(range(6))  # the outputs of teacher layers 1..6
    assert _matching_depths(states, 6) == states
    assert _matching_depths(states, 3) == [1, 3, 5]
    assert _matching_depths(states, 2) == [2, 5]
    assert _matching_depths(states, 4) == [0, 2, 3, 5]
