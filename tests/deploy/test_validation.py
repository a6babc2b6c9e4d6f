"""Argument checks of deployment (token counts, tile sizes) and the per-thread scratch of
packed layers, which ends with its thread."""

from __future__ import annotations

import gc
import threading
import weakref

import numpy as np
import pytest
import torch
from helpers import random_layer
from torch import nn

import gblr
from gblr import PackedGBLRLinear, TiledGBLRLinear


def _model():
    return nn.Sequential(random_layer(32, 24, 4, dtype=torch.float32), nn.ReLU())


# -- token counts ------------------------------------------------------------------------------
@pytest.mark.parametrize("tokens", [1.5, 2.0, True, False, [16, True], [16, 8.0], None, "64",
                                    b"6", [], 0, -3, [16, 0], torch.tensor(4.0)])
def test_deploy_refuses_token_counts_that_are_not_positive_ints(tokens):
    model = _model()
    layer = model[0]
    with pytest.raises((TypeError, ValueError), match="tokens"):
        gblr.deploy(model, tokens=tokens)
    assert model[0] is layer  # nothing replaced


def test_deploy_checks_tokens_even_without_gblr_layers():
    with pytest.raises(TypeError, match="tokens"):
        gblr.deploy(nn.Sequential(nn.Linear(4, 4)), tokens=1.5)


@pytest.mark.parametrize("tokens", [np.int64(16), torch.tensor(16), (1, np.int32(64))])
def test_deploy_takes_integer_token_counts_of_other_types(tokens):
    model = _model()
    x = torch.randn(3, 32)
    ref = model(x)
    report = gblr.deploy(model, tokens=tokens)
    assert isinstance(model[0], PackedGBLRLinear) and len(report.layers) == 1
    torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)


# -- tile sizes --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["rank_tile", "in_tile", "out_tile"])
@pytest.mark.parametrize("value", [0, -16, 8, 48, 100])
def test_tile_sizes_must_be_powers_of_two(name, value):
    layer = random_layer(32, 24, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match=f"{name} must be a power of two >= 16, got {value}"):
        layer.tiled(**{name: value})
    with pytest.raises(ValueError, match=name):
        TiledGBLRLinear.from_gblr(layer, **{name: value})


@pytest.mark.parametrize("name", ["rank_tile", "in_tile", "out_tile"])
@pytest.mark.parametrize("value", [16.0, True, "16", None])
def test_tile_sizes_must_be_ints(name, value):
    layer = random_layer(32, 24, 4, dtype=torch.float32)
    with pytest.raises(TypeError, match=name):
        layer.tiled(**{name: value})


# -- per-thread scratch ------------------------------------------------------------------------
def test_scratch_of_ended_threads_is_freed():
    layer = random_layer(64, 48, 12, seed=3, dtype=torch.float32)
    # grouped GEMMs, not the dense matrix as one GEMM: the prepared scratch path
    packed = PackedGBLRLinear.from_gblr(layer, tokens=(1, 16), allow_dense=False)
    assert [p.spec["tokens"] for p in packed.plans] == [1, 16]
    one, many = torch.randn(1, 64), torch.randn(16, 64)
    with torch.inference_mode():
        want_one, want_many = packed(one), packed(many)  # the main thread's own scratch
    plans = packed.plans
    refs: list[weakref.ref] = []
    outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
    failures: list[BaseException] = []

    def work() -> None:
        try:
            with torch.inference_mode():
                outputs.append((packed(one), packed(many)))
                # this thread's scratch buffers, through the plans' own accessors
                refs.append(weakref.ref(plans[0]._vector_steps(one)[0]))
                refs.append(weakref.ref(plans[1]._gemm_scratch(many)[0]))
        except BaseException as err:  # noqa: BLE001 - reported below
            failures.append(err)

    for _ in range(20):
        th = threading.Thread(target=work)
        th.start()
        th.join()
    del th
    gc.collect()
    assert not failures
    assert len(outputs) == 20 and len(refs) == 40
    assert all(torch.equal(a, want_one) and torch.equal(b, want_many) for a, b in outputs)
    alive = sum(r() is not None for r in refs)
    assert alive == 0, f"{alive} scratch buffers of ended threads are still held"
    # the main thread's scratch stays (and is reused)
    assert len(plans[0]._scratch) == 1 and len(plans[1]._scratch) == 1
    main_buffer = plans[0]._vector_steps(one)[0]
    with torch.inference_mode():
        assert torch.equal(packed(one), want_one)
    assert plans[0]._vector_steps(one)[0] is main_buffer
