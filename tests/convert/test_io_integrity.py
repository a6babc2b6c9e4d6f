"""Saving and loading refuse damaged, edited or inconsistent files, and never half-apply.

Compressed directories (``save_compressed`` / ``load_compressed``) and packed files
(``save_packed`` / ``load_packed``): all-or-nothing loading, checksums over configuration
and weights, field-by-field validation, NaN/Inf refusal, safe overwrite and atomic writes.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from torch import nn

from gblr import GBLRLinear, PackedGBLRLinear, load_packed, save_packed
from gblr.convert import CompressionConfig, compress, load_compressed, save_compressed


# -- helpers ------------------------------------------------------------------------------------
def base_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 10), nn.ReLU(),
                         nn.Linear(10, 6)).eval()


def compressed_model() -> nn.Module:
    model = base_model()
    cfg = CompressionConfig(calibration=False, allocation="uniform", steps=0, budget=0.5)
    compress(model, cfg, progress=False)
    with torch.no_grad():  # every layer's structure away from its initial state
        for m in model.modules():
            if isinstance(m, GBLRLinear):
                m.widths.uniform_(0.2, 0.9)
                m.locations.uniform_(0.0, 1.0)
    return model.eval()


X = torch.randn(3, 12, generator=torch.Generator().manual_seed(1))


def snapshot(model: nn.Module):
    modules = dict(model.named_modules())
    tensors = {n: (t, t.detach().clone()) for n, t in model.state_dict(keep_vars=True).items()}
    return modules, tensors


def assert_unchanged(model: nn.Module, snap) -> None:
    modules, tensors = snap
    now = dict(model.named_modules())
    assert list(now) == list(modules)
    assert all(now[n] is modules[n] for n in modules), "a module of the base was replaced"
    state = model.state_dict(keep_vars=True)
    assert list(state) == list(tensors)
    for n, (t, copy) in tensors.items():
        assert state[n] is t, n
        assert torch.equal(state[n].detach(), copy), f"tensor {n} was changed"
    assert not hasattr(model, "_gblr_compression")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def reseal(directory: Path) -> None:
    """Recompute every checksum of a saved directory, as someone editing it on purpose
    would: the directory is then consistent, but wrong."""
    record_path = directory / "compression.json"
    record = json.loads(record_path.read_text())
    record["weights_sha256"] = sha256(directory / "model.safetensors")
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    manifest = directory / "manifest.json"
    if manifest.exists():
        data = json.loads(manifest.read_text())
        data["files"] = {name: sha256(directory / name) for name in data["files"]}
        manifest.write_text(json.dumps(data, indent=2) + "\n")


def edit_record(directory: Path, edit) -> None:
    path = directory / "compression.json"
    record = json.loads(path.read_text())
    edit(record)
    path.write_text(json.dumps(record, indent=2) + "\n")


def edit_weights(directory: Path, edit) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = directory / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata=meta)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = compressed_model()
    directory = tmp_path_factory.mktemp("saved") / "c"
    save_compressed(model, directory)
    return model, directory


def copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


# -- compressed: all-or-nothing loading ---------------------------------------------------------
def test_load_round_trip(saved, tmp_path):
    model, directory = saved
    again = load_compressed(base_model(seed=3), directory)
    assert torch.equal(again(X), model(X))


@pytest.mark.parametrize("damage", ["last_layer_shape", "missing_tensor", "extra_tensor",
                                    "bad_tensor_shape", "unknown_arg", "nan_width"])
@pytest.mark.parametrize("sealed", [False, True])
def test_failed_load_leaves_base_untouched(saved, tmp_path, damage, sealed):
    _, src = saved
    directory = copy_dir(src, tmp_path / "c")
    if damage == "last_layer_shape":
        edit_record(directory, lambda r: r["layers"]["4"]["args"].update(in_features=11))
    elif damage == "unknown_arg":
        edit_record(directory, lambda r: r["layers"]["4"]["args"].update(colour="red"))
    elif damage == "missing_tensor":
        edit_weights(directory, lambda t: t.pop("4.U"))
    elif damage == "extra_tensor":
        edit_weights(directory, lambda t: t.update({"9.weight": torch.zeros(2)}))
    elif damage == "bad_tensor_shape":
        edit_weights(directory, lambda t: t.update({"4.U": torch.zeros(3, 3)}))
    else:
        def nan(t):
            t["4.widths"][0, 0] = float("nan")
        edit_weights(directory, nan)
    if sealed:
        reseal(directory)
    base = base_model(seed=7)
    snap = snapshot(base)
    with pytest.raises(ValueError):
        load_compressed(base, directory)
    assert_unchanged(base, snap)


# -- compressed: integrity of configuration and weights ----------------------------------------
@pytest.mark.parametrize("arg,value", [("sigma", 0.2), ("init_fraction", 0.9),
                                       ("path", "masked")])
def test_edited_layer_argument_is_refused(saved, tmp_path, arg, value):
    _, src = saved
    directory = copy_dir(src, tmp_path / "c")
    edit_record(directory, lambda r: r["layers"]["2"]["args"].update({arg: value}))
    base = base_model()
    snap = snapshot(base)
    with pytest.raises(ValueError, match="compression.json.*(checksum|SHA-256)"):
        load_compressed(base, directory)
    assert_unchanged(base, snap)


def test_edited_config_and_removed_manifest_are_refused(saved, tmp_path):
    _, src = saved
    directory = copy_dir(src, tmp_path / "c")
    assert (directory / "manifest.json").is_file()
    edit_record(directory, lambda r: r["config"].update(budget=0.9))
    with pytest.raises(ValueError, match="compression.json"):
        load_compressed(base_model(), directory)
    directory = copy_dir(src, tmp_path / "d")
    (directory / "manifest.json").unlink()
    with pytest.raises(ValueError, match="manifest"):
        load_compressed(base_model(), directory)


def test_directory_of_the_previous_format_still_loads(saved, tmp_path):
    """A directory written before the manifest (format v1: weights checksum only) loads,
    with a warning to save it again; its weights checksum is still checked."""
    model, src = saved
    directory = copy_dir(src, tmp_path / "c")
    (directory / "manifest.json").unlink()

    def to_v1(record):
        record["format"] = "gblr-compressed-v1"
    edit_record(directory, to_v1)
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = directory / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    meta["format"] = "gblr-compressed-v1"
    save_file(load_file(str(path)), str(path), metadata=meta)
    reseal(directory)
    with pytest.warns(UserWarning, match="save it again"):
        again = load_compressed(base_model(), directory)
    assert torch.equal(again(X), model(X))
    save_compressed(again, directory, overwrite=True)  # upgraded in place
    assert (directory / "manifest.json").is_file()


# -- compressed: NaN / Inf ---------------------------------------------------------------------
@pytest.mark.parametrize("tensor", ["widths", "U", "bias"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_save_refuses_non_finite(tmp_path, tensor, value):
    model = compressed_model()
    with torch.no_grad():
        getattr(model[2], tensor).view(-1)[0] = value
    with pytest.raises(ValueError, match=rf"2\.{tensor}.*(NaN|Inf)"):
        save_compressed(model, tmp_path / "c")
    assert not (tmp_path / "c").exists() and list(tmp_path.iterdir()) == []


def test_load_refuses_non_finite_naming_the_tensor(saved, tmp_path):
    _, src = saved
    directory = copy_dir(src, tmp_path / "c")

    def inf(t):
        t["2.V"][0, 0] = float("inf")
    edit_weights(directory, inf)
    reseal(directory)
    with pytest.raises(ValueError, match=r"2\.V.*(NaN|Inf)"):
        load_compressed(base_model(), directory)


# -- compressed: overwrite and atomic writes ---------------------------------------------------
def test_overwrite_refuses_a_directory_gblr_did_not_write(tmp_path):
    model = compressed_model()
    target = tmp_path / "mine"
    target.mkdir()
    (target / "thesis.tex").write_text("years of work")
    with pytest.raises(FileExistsError, match="not written by gblr"):
        save_compressed(model, target, overwrite=True)
    assert (target / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
    plain = tmp_path / "file"
    plain.write_text("x")
    with pytest.raises(FileExistsError):
        save_compressed(model, plain, overwrite=True)
    assert plain.read_text() == "x"


def test_overwrite_replaces_a_gblr_directory_atomically(tmp_path, monkeypatch):
    model = compressed_model()
    target = tmp_path / "c"
    save_compressed(model, target)
    (target / "notes.txt").write_text("old")
    save_compressed(model, target, overwrite=True)  # a gblr directory: replaced
    assert not (target / "notes.txt").exists() and (target / "manifest.json").is_file()
    # (safetensors orders its metadata freely: two saves may differ byte for byte)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    import safetensors.torch

    def boom(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with torch.no_grad():
        model[0].U.mul_(2)
    with pytest.raises(OSError, match="disk full"):
        save_compressed(model, target, overwrite=True)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no temporary left


# -- packed files ------------------------------------------------------------------------------
def random_layer(n_in=30, n_out=20, k=10, seed=13, dtype=torch.float32):
    torch.manual_seed(seed)
    layer = GBLRLinear(n_in, n_out, num_components=k, init="random").to(dtype)
    with torch.no_grad():
        layer.widths.uniform_(0.0, 1.0)
        layer.locations.uniform_(0.0, 1.0)
        layer.bias.normal_()
    return layer.eval()


def grouped(tokens=(1, 64)):
    return PackedGBLRLinear.from_gblr(random_layer(), tokens=tokens, allow_dense=False)


def rewrite(src: Path, dst: Path, edit_meta=None, edit_tensors=None, drop=()) -> Path:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(src))
    entries = json.loads(meta["gblr.packed"])
    if edit_meta:
        edit_meta(entries)
    if edit_tensors:
        edit_tensors(tensors)
    meta["gblr.packed"] = json.dumps(entries)
    for key in drop:
        meta.pop(key, None)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def tensor_offset(path: Path, name: str) -> int:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    return 8 + n + header[name]["data_offsets"][0]


def test_packed_flipped_byte_is_refused(tmp_path):
    packed = grouped()
    path = tmp_path / "p.safetensors"
    save_packed(packed, path)
    data = bytearray(path.read_bytes())
    data[tensor_offset(path, "/plan0.w0")] ^= 0x01  # lowest mantissa bit: still finite
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        load_packed(path)
    data = bytearray(path.read_bytes())
    data[tensor_offset(path, "/bias")] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        load_packed(path)


def _set(key, value, plan=None):
    def edit(entries):
        target = entries[""] if plan is None else entries[""]["plans"][plan]
        target[key] = value
    return edit


@pytest.mark.parametrize("edit,field", [
    (_set("in_features", 31), "in_features"),
    (_set("out_features", 0), "out_features"),
    (_set("true_macs", -5), "true_macs"),
    (_set("true_macs", "many"), "true_macs"),
    (_set("bias", "yes"), "bias"),
    (_set("form", "fused"), "form"),
    (_set("plans", []), "plans"),
    (_set("macs", -1, plan=0), "macs"),
    (_set("tokens", -3, plan=1), "tokens"),
    (_set("tokens", 1.5, plan=1), "tokens"),
    (_set("in", 31, plan=0), "in"),
    (_set("h_width", -1, plan=1), "h_width"),
    (_set("n_weights", 99, plan=0), "n_weights"),
    (_set("perm", [10 ** 6], plan=1), "perm"),
    (_set("full", 7, plan=0), "full"),
])
def test_packed_metadata_fields_are_validated(tmp_path, edit, field):
    path = tmp_path / "p.safetensors"
    save_packed(grouped(), path)
    bad = rewrite(path, tmp_path / "bad.safetensors", edit_meta=edit)
    with pytest.raises(ValueError, match=rf"layer ''.*\b{field}\b"):
        load_packed(bad)


def test_packed_missing_fields_raise_value_errors(tmp_path):
    path = tmp_path / "p.safetensors"
    save_packed(grouped(), path)
    for key in ("true_macs", "in_features", "plans", "bias"):
        bad = rewrite(path, tmp_path / f"{key}.safetensors",
                      edit_meta=lambda e, key=key: e[""].pop(key))
        with pytest.raises(ValueError, match=key):
            load_packed(bad)
    bad = rewrite(path, tmp_path / "t.safetensors", edit_tensors=lambda t: t.pop("/plan0.w0"))
    with pytest.raises(ValueError, match="plan0.w0"):
        load_packed(bad)
    bad = rewrite(path, tmp_path / "x.safetensors",
                  edit_tensors=lambda t: t.update({"/stray": torch.zeros(1)}))
    with pytest.raises(ValueError, match="stray"):
        load_packed(bad)
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(1)}, str(tmp_path / "j.safetensors"),
              metadata={"gblr.packed": "{not json"})
    with pytest.raises(ValueError, match="JSON"):
        load_packed(tmp_path / "j.safetensors")


@pytest.mark.parametrize("stage,position,value", [
    ("stage1", 1, 10 ** 4),   # column slice past in_features
    ("stage1", 0, -1),        # negative start
    ("stage1", 3, 10 ** 4),   # h slice past h_width
    ("stage1", 4, 10 ** 3),   # weight index past the weights
    ("stage2", 1, 10 ** 4),   # row slice past out_features
    ("stage2", 4, -1),        # negative weight index
])
def test_packed_gemm_slices_are_checked(tmp_path, stage, position, value):
    path = tmp_path / "p.safetensors"
    save_packed(grouped(tokens=64), path)

    def edit(entries):
        ops = entries[""]["plans"][0][stage]
        assert ops, "the packing has GEMMs of this stage"
        ops[0][position] = value
    bad = rewrite(path, tmp_path / "bad.safetensors", edit_meta=edit)
    with pytest.raises(ValueError, match=rf"layer ''.*{stage}"):
        load_packed(bad)


def test_packed_weight_shape_must_match_its_slice(tmp_path):
    path = tmp_path / "p.safetensors"
    save_packed(grouped(tokens=64), path)

    def edit(tensors):
        w = tensors["/plan0.w0"]
        tensors["/plan0.w0"] = torch.zeros(w.shape[0], w.shape[1] + 1)
    bad = rewrite(path, tmp_path / "bad.safetensors", edit_tensors=edit)
    with pytest.raises(ValueError, match="plan0.w0"):
        load_packed(bad)


def test_packed_old_file_without_checksum(tmp_path):
    packed = grouped()
    path = tmp_path / "p.safetensors"
    save_packed(packed, path)
    old = rewrite(path, tmp_path / "old.safetensors",
                  drop=("gblr.packed.format", "gblr.packed.sha256"))
    with pytest.raises(ValueError, match="save_packed"):
        load_packed(old)
    loaded = load_packed(old, allow_unverified=True)  # once, to save it again
    x = torch.randn(4, 30)
    assert torch.equal(loaded(x), packed(x))


def test_packed_nan_refused_at_save_and_load(tmp_path):
    packed = grouped()
    with torch.no_grad():
        packed.plans[0].w0[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"plan0\.w0.*NaN"):
        save_packed(packed, tmp_path / "p.safetensors")
    assert not (tmp_path / "p.safetensors").exists()
    good = tmp_path / "good.safetensors"
    save_packed(grouped(), good)

    def nan(tensors):
        tensors["/bias"][1] = float("inf")
    bad = rewrite(good, tmp_path / "bad.safetensors", edit_tensors=nan)
    with pytest.raises(ValueError, match=r"bias.*Inf"):
        load_packed(bad)


def test_packed_failed_model_load_leaves_model_untouched(tmp_path):
    model = nn.Sequential(random_layer(16, 24, 8, seed=1), nn.GELU(),
                          random_layer(24, 16, 8, seed=2))
    model[0] = model[0].packed()
    model[2] = model[2].packed()
    path = tmp_path / "m.safetensors"
    save_packed(model, path)

    def edit(entries):
        entries["2"]["plans"][0]["macs"] = -1
    bad = rewrite(path, tmp_path / "bad.safetensors", edit_meta=edit)
    template = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 16))
    snap = snapshot(template)
    with pytest.raises(ValueError, match="layer '2'.*macs"):
        load_packed(bad, template)
    assert_unchanged(template, snap)
    load_packed(path, template)
    assert isinstance(template[2], PackedGBLRLinear)


def test_tiled_file_round_trip_and_checksum(tmp_path):
    tiled = random_layer(20, 40, 6, seed=5).tiled()
    path = tmp_path / "t.safetensors"
    save_packed(tiled, path)
    x = torch.randn(3, 20)
    assert torch.equal(load_packed(path)(x), tiled(x))
    bad = rewrite(path, tmp_path / "b.safetensors", edit_meta=_set("backend", "cuda"))
    with pytest.raises(ValueError, match="backend"):
        load_packed(bad)
    bad = rewrite(path, tmp_path / "c.safetensors", edit_meta=_set("rank_tile", "16"))
    with pytest.raises(ValueError, match="rank_tile"):
        load_packed(bad)

    def scale(tensors):
        tensors["/tiles2"] = tensors["/tiles2"] * 2
    bad = rewrite(path, tmp_path / "d.safetensors", edit_tensors=scale)
    with pytest.raises(ValueError, match="checksum"):
        load_packed(bad)


# -- packed: overwrite and atomic writes -------------------------------------------------------
def test_save_packed_refuses_existing_file_and_writes_atomically(tmp_path, monkeypatch):
    path = tmp_path / "p.safetensors"
    path.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_packed(grouped(), path)
    assert path.read_bytes() == b"precious"
    save_packed(grouped(), path, overwrite=True)
    good = path.read_bytes()
    import safetensors.torch

    def boom(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_packed(grouped(tokens=4), path, overwrite=True)
    assert path.read_bytes() == good
    assert sorted(os.listdir(tmp_path)) == ["p.safetensors"]


# -- dtypes ------------------------------------------------------------------------------------
def test_check_float_dtype():
    from gblr.core.validate import check_float_dtype

    assert check_float_dtype("dtype", torch.bfloat16) is torch.bfloat16
    for bad in (torch.int8, torch.int64, torch.bool, torch.complex64):
        with pytest.raises(ValueError, match=rf"dtype must be a floating.*{str(bad)[6:]}"):
            check_float_dtype("dtype", bad)
    with pytest.raises(TypeError, match="dtype"):
        check_float_dtype("dtype", "float32")


def test_save_packed_refuses_integer_weights(tmp_path):
    with pytest.raises(ValueError, match="floating"):  # refused before packing
        PackedGBLRLinear.from_gblr(random_layer(), tokens=64, dtype=torch.int8)
    with pytest.raises(ValueError, match="floating"):
        random_layer().tiled(dtype=torch.int8)
    packed = PackedGBLRLinear.from_gblr(random_layer(), tokens=64)
    with torch.no_grad():  # weights made integer behind the packer's back
        packed.plans[0].w0 = packed.plans[0].w0.to(torch.int8)
    with pytest.raises(ValueError, match="floating"):
        save_packed(packed, tmp_path / "p.safetensors")
    good = tmp_path / "good.safetensors"
    save_packed(grouped(tokens=64), good)
    bad = rewrite(good, tmp_path / "bad.safetensors",
                  edit_tensors=lambda t: t.update({"/plan0.w0": t["/plan0.w0"].to(torch.int8)}))
    with pytest.raises(ValueError, match="floating"):
        load_packed(bad)
