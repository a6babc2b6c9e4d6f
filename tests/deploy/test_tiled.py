"""The tiled inference form (block-sparse stages) and its Triton kernels.

The kernels run through Triton's CPU interpreter where Triton is installed, so their
indexing is checked without a GPU; the CUDA test runs them compiled.
"""

import pytest
import torch
from helpers import random_layer
from torch import nn

import gblr
from gblr import GBLRLinear, TiledGBLRLinear, deploy, load_packed, save_packed
from gblr.deploy.tiled import triton_available

needs_triton = pytest.mark.skipif(not triton_available(), reason="Triton is not installed")


def _interpreter_runs_kernels() -> bool:
    """Whether Triton's CPU interpreter runs the kernels: the interpreter of Triton 3.6
    hands a loaded loop bound to ``range`` as a 1-element array, and fails."""
    if not triton_available():
        return False
    from gblr.deploy.triton_kernels import tiled_linear

    tiled = random_layer(8, 8, 2, seed=0, dtype=torch.float32).tiled()
    try:
        tiled_linear(torch.randn(1, 8), tiled, interpret=True)
    except Exception:  # noqa: BLE001 - the interpreter wraps the TypeError in its own error
        return False
    return True


needs_interpreter = pytest.mark.skipif(
    not _interpreter_runs_kernels(),
    reason="Triton is not installed, or its interpreter cannot run the kernels (Triton 3.6)",
)


def tiled_forms(layer, **kw):
    """The two-stage and the direct tiling of ``layer``."""
    return [TiledGBLRLinear.from_gblr(layer, direct=d, **kw) for d in (False, True)]


def interpret(tiled, x):
    from gblr.deploy.triton_kernels import tiled_linear

    return tiled_linear(x.reshape(-1, tiled.in_features), tiled, interpret=True).reshape(
        *x.shape[:-1], tiled.out_features)


@pytest.mark.parametrize(
    "n_in,n_out,k,r", [(37, 53, 20, 1), (64, 48, 12, 2), (100, 30, 30, 1), (7, 5, 9, 1),
                       (200, 150, 24, 4)]
)
def test_random_layers_exact(n_in, n_out, k, r):
    layer = random_layer(n_in, n_out, k, r, seed=n_in)
    x = torch.randn(3, 5, n_in, dtype=torch.float64)
    ref = layer(x)
    for tiled in tiled_forms(layer):
        assert torch.allclose(tiled(x), ref, atol=1e-10, rtol=0)
        assert torch.allclose(tiled.to_dense(), layer.to_dense(), atol=1e-12, rtol=0)
        assert tiled.num_gemms() == (1 if tiled.direct else 2)


def test_structure_edge_cases_exact():
    layer = random_layer(41, 29, 12, seed=1)
    with torch.no_grad():
        layer.widths[:, 0:3] = 1.0  # full width
        layer.widths[:, 3] = 0.0  # off
        layer.widths[:, 5:8] = 0.5  # wrap-around bands on both axes
        layer.locations[:, 5:8] = 0.8
    layer.sigma = 4.0  # smooth (non-0/1) masks are folded into the factors
    x = torch.randn(9, 41, dtype=torch.float64)
    for tiled in tiled_forms(layer, rank_tile=16, in_tile=16, out_tile=16):
        assert torch.allclose(tiled(x), layer(x), atol=1e-10, rtol=0)


def test_tiles_skip_zeros_and_all_off_layer_gives_bias():
    torch.manual_seed(4)
    w = torch.randn(64, 128, dtype=torch.float64)
    grid = torch.zeros(4, 8, dtype=torch.bool)
    grid[0, 0] = grid[2, 5] = grid[3, 7] = True
    layer = GBLRLinear.from_block_sparse(w, grid, (16, 16)).eval()
    tiled = TiledGBLRLinear.from_gblr(layer, 16, 16, 16)
    assert tiled.direct and tiled.num_tiles() == (0, 3)  # only the three nonzero blocks
    assert tiled.macs() == layer.macs() == 3 * 256
    x = torch.randn(5, 128, dtype=torch.float64)
    assert torch.allclose(tiled(x), layer(x), atol=1e-10, rtol=0)
    off = random_layer(20, 30, 6)
    with torch.no_grad():
        off.widths.zero_()
    for t in tiled_forms(off):
        assert t.macs() == 0
        assert torch.equal(t(torch.randn(4, 20, dtype=torch.float64)), off.bias.expand(4, 30))


def test_two_stage_tiling_of_a_banded_layer_is_near_its_cost():
    layer = random_layer(512, 384, 64, r=2, seed=5, dtype=torch.float32)
    with torch.no_grad():  # narrow bands: a low-cost layer
        layer.widths.uniform_(0.05, 0.25)
    tiled = layer.tiled()
    assert not tiled.direct and tiled.num_tiles()[0] > 0
    assert layer.macs() <= tiled.macs() < 0.8 * 512 * 384
    x = torch.randn(7, 512)
    assert torch.allclose(tiled(x), layer(x), atol=1e-5, rtol=1e-5)


def test_gradients_flow_through_the_torch_path():
    tiled = random_layer(30, 20, 8, seed=6, dtype=torch.float32).tiled()
    x = torch.randn(4, 30, requires_grad=True)
    tiled(x).sum().backward()
    assert torch.allclose(x.grad, tiled.to_dense().sum(0).expand(4, 30), atol=1e-5)


def test_torch_compile_whole_graph():
    layer = random_layer(64, 48, 12, seed=1, dtype=torch.float32)
    compiled = torch.compile(layer.tiled(), backend="eager", fullgraph=True)
    x = torch.randn(2, 5, 64)
    assert torch.allclose(compiled(x), layer(x), atol=1e-5, rtol=1e-5)


def test_bad_input():
    layer = random_layer(16, 12, 4)
    with pytest.raises(ValueError, match="power of two"):
        layer.tiled(rank_tile=8)
    with pytest.raises(ValueError, match="power of two"):
        layer.tiled(in_tile=48)
    with pytest.raises(ValueError, match="backend"):
        TiledGBLRLinear.from_gblr(layer, backend="cuda")
    with pytest.raises(TypeError, match="GBLRLinear"):
        TiledGBLRLinear.from_gblr(nn.Linear(4, 4))
    tiled = layer.tiled()
    with pytest.raises(ValueError, match=r"\(\.\.\., 16\)"):
        tiled(torch.randn(3, 15, dtype=torch.float64))
    assert "tiles=" in repr(tiled) and "direct=" in repr(tiled)


def test_deploy_tiled_and_save_load(tmp_path):
    model = nn.Sequential(random_layer(24, 40, 10, seed=7, dtype=torch.float32), nn.GELU(),
                          random_layer(40, 24, 10, seed=8, dtype=torch.float32))
    x = torch.randn(2, 5, 24)
    ref = model(x)
    report = deploy(model, form="tiled")
    assert all(isinstance(model[i], TiledGBLRLinear) for i in (0, 2))
    assert [r.name for r in report.layers] == ["0", "2"]
    assert torch.allclose(model(x), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="form"):
        deploy(model, form="fused")
    with pytest.raises(ValueError, match="tune"):
        deploy(nn.Sequential(random_layer(4, 4, 2)), form="tiled", tune=True)
    save_packed(model, tmp_path / "m.safetensors")
    template = nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 24))
    load_packed(tmp_path / "m.safetensors", template)
    assert isinstance(template[2], TiledGBLRLinear)
    assert torch.equal(template(x), model(x))
    # a file whose tile indices were damaged fails to load
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "m.safetensors"))
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        meta = f.metadata()
    key = "2/idx2"
    tensors[key] = tensors[key] + 1000
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="inconsistent"):
        load_packed(tmp_path / "bad.safetensors", template)
    lone = random_layer(10, 12, 4, seed=9).tiled()
    save_packed(lone, tmp_path / "lone.safetensors")
    assert torch.equal(load_packed(tmp_path / "lone.safetensors")(x[0, :, :10].double()),
                       lone(x[0, :, :10].double()))
    assert gblr.TiledGBLRLinear is TiledGBLRLinear


@needs_interpreter
@pytest.mark.parametrize("tokens", [1, 5, 40, 70])
def test_triton_kernels_match_the_torch_path(tokens):
    layer = random_layer(100, 72, 24, r=2, seed=10, dtype=torch.float32)
    x = torch.randn(tokens, 100)
    ref = layer(x)
    for tiled in tiled_forms(layer, rank_tile=16, in_tile=32, out_tile=32):
        assert torch.allclose(interpret(tiled, x), ref, atol=1e-5, rtol=1e-5)
        assert torch.allclose(interpret(tiled, x), tiled(x), atol=1e-5, rtol=1e-5)


@needs_interpreter
def test_triton_kernels_block_m():
    from gblr.deploy.triton_kernels import tiled_linear

    tiled = random_layer(100, 72, 24, r=2, seed=10, dtype=torch.float32).tiled()
    x = torch.randn(20, 100)
    for block_m in (16, 32, 64):
        out = tiled_linear(x, tiled, interpret=True, block_m=block_m)
        assert torch.allclose(out, tiled(x), atol=1e-5, rtol=1e-5)
    for bad in (8, 48):
        with pytest.raises(ValueError, match="block_m"):
            tiled_linear(x, tiled, interpret=True, block_m=bad)


@needs_interpreter
def test_triton_kernels_bfloat16_no_bias_and_all_off():
    layer = random_layer(64, 48, 12, seed=11, bias=False, dtype=torch.float32)
    x = torch.randn(3, 64)
    ref = layer(x)
    tiled = layer.tiled(dtype=torch.bfloat16)
    out = interpret(tiled, x.bfloat16())
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).norm() / ref.norm() < 2e-2
    assert torch.allclose(out.float(), tiled(x.bfloat16()).float(), atol=5e-2, rtol=2e-2)
    off = random_layer(20, 30, 6, seed=12, dtype=torch.float32)
    with torch.no_grad():
        off.widths.zero_()
    assert torch.equal(interpret(off.tiled(), torch.randn(2, 20)), off.bias.expand(2, 30))


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and triton_available()),
                    reason="needs a CUDA device and Triton")
def test_cuda_triton_kernels_match_masked_layer():
    layer = random_layer(256, 384, 48, r=2, seed=13, dtype=torch.float32).cuda()
    for tokens in (1, 33, 600):
        x = torch.randn(tokens, 256, device="cuda")
        ref = layer(x)
        for tiled in tiled_forms(layer):
            assert tiled.uses_triton(x)
            assert torch.allclose(tiled(x), ref, atol=1e-4, rtol=1e-4)
    out = layer.tiled(dtype=torch.bfloat16)(x.bfloat16())
    assert (out.float() - ref).norm() / ref.norm() < 2e-2


@needs_triton
@pytest.mark.parametrize("capability", [80, 90])
def test_triton_kernels_compile_for_cuda_without_a_gpu(capability):
    import warnings

    from gblr.deploy.triton_kernels import block_tokens, compile_kernels

    with warnings.catch_warnings():  # Triton's notice about its FP-fusion default
        warnings.simplefilter("ignore", UserWarning)
        for dtype in (torch.float32, torch.bfloat16):
            for tokens in (1, 4096):
                kernels = compile_kernels(capability, dtype, block_m=block_tokens(tokens),
                                          bias=tokens == 1)
                assert all(len(k.asm["cubin"]) > 0 for k in kernels)
    with pytest.raises(ValueError, match="dtype"):
        compile_kernels(90, torch.float64)
