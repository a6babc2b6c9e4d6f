"""The measured speed-up of a compressed model against its dense original."""

import pytest
import torch
from torch import nn

import gblr
from gblr.convert.speedup import measured_speedup, text_inputs


class _TwoLayers(nn.Module):
    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.relu(self.first(x)))


def _pair():
    torch.manual_seed(0)
    dense = _TwoLayers(nn.Linear(64, 96), nn.Linear(96, 64)).eval()
    compressed = _TwoLayers(gblr.GBLRLinear.from_dense(dense.first.weight, 0.4, steps=0),
                            gblr.GBLRLinear.from_dense(dense.second.weight, 0.4, steps=0))
    return dense, compressed.eval()


def test_times_each_setting_and_leaves_the_compressed_model_alone():
    dense, compressed = _pair()
    threads = torch.get_num_threads()
    result = measured_speedup(dense, compressed, {"8": {"x": torch.randn(8, 64)},
                                                  "64": {"x": torch.randn(64, 64)}},
                              threads=1, reps=2, min_time=0.001)
    assert [r["setting"] for r in result["rows"]] == ["8", "64"]
    for row in result["rows"]:
        assert row["dense_ms"] > 0 and row["deployed_ms"] > 0
        assert row["speedup"] == pytest.approx(row["dense_ms"] / row["deployed_ms"])
    assert result["threads"] == 1 and result["deployed_layers"] == 2
    assert torch.get_num_threads() == threads  # restored
    assert isinstance(compressed.first, gblr.GBLRLinear)  # a copy was deployed


def test_bad_arguments_are_refused():
    dense, compressed = _pair()
    with pytest.raises(ValueError, match="at least one input setting"):
        measured_speedup(dense, compressed, {})
    with pytest.raises(ValueError, match="threads and reps"):
        measured_speedup(dense, compressed, {"8": {"x": torch.randn(8, 64)}}, threads=0)
    with pytest.raises(ValueError, match="must be positive"):
        text_inputs(0, 128, 100)


def test_text_inputs_are_a_full_batch_of_token_ids():
    batch = text_inputs(2, 16, 50)
    assert batch["input_ids"].shape == (2, 16) and int(batch["input_ids"].max()) < 50
    assert bool(batch["attention_mask"].all())
    assert torch.equal(batch["input_ids"], text_inputs(2, 16, 50)["input_ids"])  # seeded
