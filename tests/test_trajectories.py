"""TrajectoryStore format, lazy reads and validation errors (docs/formats.md)."""

import json
import os
import warnings

import pytest
import torch
from torch import nn

import lightning_distill.models as ld_models
from lightning_distill.models.params import ParamSpec
from lightning_distill.trajectories import TrajectoryStore, TrajectoryStoreError

SPEC = ParamSpec(("fc.weight", "fc.bias"), ((2, 3), (2,)))  # P = 8
S = 4  # snapshots (3 epochs)
MODEL = {"name": "Tiny", "channels": 1, "num_classes": 2, "image_size": (3, 1), "width": 5}
INPUT = {"normalize": {"mean": [0.5], "std": [0.25]}, "zca": None}


def make_store(path, **overrides):
    kw = dict(
        spec=SPEC, num_snapshots=S, model=MODEL, dataset="toy", input_space=INPUT,
        hparams={"lr": 0.01, "epochs": 3},
    )
    kw.update(overrides)
    return TrajectoryStore.create(path, **kw)


def traj(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(S, SPEC.total, generator=g)


class Tiny(nn.Module):
    def __init__(self, out=2):
        super().__init__()
        self.fc = nn.Linear(3, out)


# ----------------------------------------------------------------- meta / create / open
def test_create_open_meta_round_trip(tmp_path):
    store = make_store(tmp_path / "s")
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    assert meta["format_version"] == 1
    assert meta["dataset"] == "toy"
    assert meta["model"] == {**MODEL, "image_size": [3, 1]}
    assert meta["spec"] == {"names": ["fc.weight", "fc.bias"], "shapes": [[2, 3], [2]]}
    assert meta["num_snapshots"] == 4 and meta["num_params"] == 8
    assert meta["input_space"] == INPUT and meta["hparams"] == {"lr": 0.01, "epochs": 3}
    assert "created" in meta and "library_version" in meta
    opened = TrajectoryStore.open(tmp_path / "s")
    assert opened.spec == SPEC == store.spec
    assert (opened.num_snapshots, opened.num_params, len(opened)) == (4, 8, 0)
    assert opened.meta == store.meta
    # re-creating with the same identity returns the existing store (resume)
    again = make_store(tmp_path / "s")
    assert again.meta["created"] == meta["created"]


@pytest.mark.parametrize(
    "field, change",
    [
        ("spec", {"spec": ParamSpec(("fc.weight", "fc.bias"), ((2, 4), (2,)))}),
        ("num_snapshots", {"num_snapshots": 5}),
        ("model", {"model": {**MODEL, "width": 6}}),
        ("dataset", {"dataset": "other"}),
        ("input_space", {"input_space": {**INPUT, "zca": "abc123"}}),
    ],
)
def test_recreate_mismatch_names_field(tmp_path, field, change):
    make_store(tmp_path / "s")
    with pytest.raises(TrajectoryStoreError, match=f"field '{field}' differs"):
        make_store(tmp_path / "s", **change)


def test_recreate_other_hparams_warns_and_keeps(tmp_path):
    make_store(tmp_path / "s")
    with pytest.warns(UserWarning, match=r"hyperparameters differ.*\['lr'\]"):
        store = make_store(tmp_path / "s", hparams={"lr": 0.1, "epochs": 3})
    assert store.hparams["lr"] == 0.01
    with pytest.raises(TrajectoryStoreError, match="exist_ok"):
        make_store(tmp_path / "s", exist_ok=False)


def test_open_missing_or_corrupt_meta(tmp_path):
    with pytest.raises(TrajectoryStoreError, match="meta.json not found"):
        TrajectoryStore.open(tmp_path)
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(TrajectoryStoreError, match=r"meta.json is unreadable or corrupt"):
        TrajectoryStore.open(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"format_version": 1, "dataset": "x"}))
    with pytest.raises(TrajectoryStoreError, match="lacks required field"):
        TrajectoryStore.open(tmp_path)
    make_store(tmp_path / "v")
    meta = json.loads((tmp_path / "v" / "meta.json").read_text())
    (tmp_path / "v" / "meta.json").write_text(json.dumps({**meta, "format_version": 2}))
    with pytest.raises(TrajectoryStoreError, match="format_version 2"):
        TrajectoryStore.open(tmp_path / "v")


def test_expert_files_without_meta_refused(tmp_path):
    torch.save(traj(0), tmp_path / "expert_00000.pt")
    with pytest.raises(TrajectoryStoreError, match="no meta.json"):
        make_store(tmp_path)


# ------------------------------------------------------------------ write / read
def test_write_and_mmap_read_identical(tmp_path):
    store = make_store(tmp_path / "s")
    t = traj(1)
    store.write_expert(0, t)
    assert (tmp_path / "s" / "expert_00000.pt").is_file()
    for mmap in (True, False):
        got = store.load_expert(0, mmap=mmap)
        assert got.dtype == torch.float32 and torch.equal(got, t)
    assert torch.equal(store.snapshot(0, 2), t[2])
    assert torch.equal(store.snapshot(0, -1), t[3])
    assert torch.equal(store.final_snapshot(0), t[3])
    assert torch.equal(store.snapshots(0, [3, 0, 1]), t[[3, 0, 1]])
    # snapshot() returns a copy: editing it changes neither the file nor later reads
    s = store.snapshot(0, 1)
    s.zero_()
    assert torch.equal(store.snapshot(0, 1), t[1])
    assert torch.equal(TrajectoryStore.open(tmp_path / "s").load_expert(0), t)
    with pytest.raises(IndexError, match="4 snapshots"):
        store.snapshot(0, 4)


def test_write_float64_stored_as_float32_and_views_saved_compactly(tmp_path):
    store = make_store(tmp_path / "s")
    big = torch.randn(10, S, SPEC.total, dtype=torch.float64)
    store.write_expert(0, big[3])  # a view into a larger storage
    got = store.load_expert(0, mmap=False)
    assert got.dtype == torch.float32 and torch.equal(got, big[3].float())
    assert got.untyped_storage().nbytes() == S * SPEC.total * 4


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="Linux only")
def test_load_is_memory_mapped(tmp_path):
    store = make_store(tmp_path / "s")
    store.write_expert(7, traj(7))
    fresh = TrajectoryStore.open(tmp_path / "s")
    t = fresh.load_expert(7)
    with open("/proc/self/maps") as f:
        assert str(fresh.expert_path(7)) in f.read()
    assert torch.equal(t, traj(7))


def test_write_expert_wrong_shape(tmp_path):
    store = make_store(tmp_path / "s")
    with pytest.raises(ValueError, match=r"shape \[3, 8\].*expects \[4, 8\]"):
        store.write_expert(0, torch.zeros(3, 8))
    assert store.num_experts == 0


def test_first_missing_and_indices(tmp_path):
    store = make_store(tmp_path / "s")
    for i in (0, 1, 3):
        store.write_expert(i, traj(i))
    (tmp_path / "s" / ".expert_00002.pt.deadbeef.tmp").write_bytes(b"junk")  # killed write
    (tmp_path / "s" / "expert_00002.partial.pt").write_bytes(b"junk")
    assert store.expert_indices() == [0, 1, 3]
    assert store.first_missing() == 2
    assert store.num_experts == len(store) == 3
    with pytest.raises(TrajectoryStoreError, match=r"expert_00002.pt not found"):
        store.snapshot(2, 0)


# --------------------------------------------------------------------- validation
@pytest.mark.parametrize("chop", [30, 0.5])
def test_truncated_expert_file(tmp_path, chop):
    store = make_store(tmp_path / "s")
    store.write_expert(0, traj(0))
    path = store.expert_path(0)
    data = path.read_bytes()
    keep = len(data) - chop if isinstance(chop, int) else int(len(data) * chop) // 8
    path.write_bytes(data[:keep])
    fresh = TrajectoryStore.open(tmp_path / "s")
    with pytest.raises(TrajectoryStoreError, match=r"expert_00000\.pt is truncated") as e:
        fresh.snapshot(0, 0)
    assert "lightning-distill experts" in str(e.value) and "delete it" in str(e.value)
    with pytest.raises(TrajectoryStoreError, match=r"expert_00000\.pt"):
        fresh.validate(deep=True)


def test_garbage_expert_file(tmp_path):
    store = make_store(tmp_path / "s")
    store.expert_path(0).write_bytes(b"x" * 1000)
    with pytest.raises(TrajectoryStoreError, match=r"expert_00000\.pt is truncated or corrupt"):
        store.load_expert(0)


@pytest.mark.parametrize(
    "bad, desc",
    [
        (torch.zeros(3, 8), r"float32 tensor of shape \[3, 8\].*float32 \[4, 8\]"),
        (torch.zeros(4, 9), r"float32 tensor of shape \[4, 9\].*\[4, 8\]"),
        (torch.zeros(4, 8, dtype=torch.float64), r"float64 tensor of shape \[4, 8\]"),
    ],
)
def test_wrong_shape_or_dtype_on_read(tmp_path, bad, desc):
    store = make_store(tmp_path / "s")
    torch.save(bad, store.expert_path(1))
    with pytest.raises(TrajectoryStoreError, match=r"expert_00001\.pt holds a " + desc):
        store.load_expert(1)
    store.validate(deep=False)  # the cheap check only looks at file sizes
    with pytest.raises(TrajectoryStoreError, match=r"expert_00001\.pt"):
        store.validate(deep=True)


def test_validate_checksums_detects_flipped_byte(tmp_path):
    store = make_store(tmp_path / "s")
    t = torch.full((S, SPEC.total), 1.25)
    store.write_expert(0, t)
    store.write_expert(1, traj(1))
    assert store.validate(deep=True, checksums=True) == [0, 1]
    path = store.expert_path(0)
    data = bytearray(path.read_bytes())
    off = bytes(data).find(t.numpy().tobytes()[:16])
    data[off + 5] ^= 0xFF
    path.write_bytes(bytes(data))
    store.validate(deep=True)  # header and shape still fine
    with pytest.raises(TrajectoryStoreError, match=r"expert_00000\.pt is corrupt \(checksum"):
        store.validate(checksums=True)


# ---------------------------------------------------------------------- models
def test_check_model(tmp_path):
    store = make_store(tmp_path / "s")
    store.check_model(Tiny())
    with pytest.raises(TrajectoryStoreError, match=r"parameter #0: store has fc.weight \[2, 3\], "
                       r"model has fc.weight \[4, 3\]"):
        store.check_model(Tiny(out=4))
    no_bias = Tiny()
    no_bias.fc.bias = None  # fc.weight matches, then the model runs out of tensors
    with pytest.raises(TrajectoryStoreError, match="store has 2 parameter tensors, model has 1"):
        store.check_model(no_bias)
    with pytest.raises(TrajectoryStoreError, match=r"store has fc.weight .* model has 0.weight"):
        store.check_model(nn.Sequential(nn.Linear(3, 2)))


def test_build_model_uses_meta_kwargs(tmp_path, monkeypatch):
    calls = []

    def fake_build_model(name, channels, num_classes, image_size, **kw):
        calls.append((name, channels, num_classes, image_size, kw))
        return Tiny(out=num_classes)

    monkeypatch.setattr(ld_models, "build_model", fake_build_model, raising=False)
    store = make_store(tmp_path / "s")
    net = TrajectoryStore.open(tmp_path / "s").build_model()
    assert isinstance(net, Tiny)
    assert calls == [("Tiny", 1, 2, (3, 1), {"width": 5})]  # JSON list back to a tuple
    with pytest.raises(TrajectoryStoreError, match="does not match"):
        store.build_model(num_classes=3)


# ------------------------------------------------------------- replay buffer import
def test_no_warnings_on_normal_use(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        store = make_store(tmp_path / "s")
        store.write_expert(0, traj(0))
        store.snapshot(0, 1)


def test_failed_write_leaves_no_expert(tmp_path, monkeypatch):
    store = make_store(tmp_path / "s")
    store.write_expert(0, traj(0))

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial")
        raise OSError("no space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="no space"):
        store.write_expert(1, traj(1))
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["expert_00000.pt", "meta.json"]
    assert store.first_missing() == 1


def test_cache_sees_rewrites_and_pickles_small(tmp_path):
    import pickle

    store = make_store(tmp_path / "s")
    store.write_expert(0, traj(0))
    assert torch.equal(store.snapshot(0, 1), traj(0)[1])
    other = TrajectoryStore.open(tmp_path / "s")  # another process/instance rewrites expert 0
    other.write_expert(0, traj(5))
    assert torch.equal(store.snapshot(0, 1), traj(5)[1])
    clone = pickle.loads(pickle.dumps(store))
    assert clone._cache == {} and torch.equal(clone.snapshot(0, 2), traj(5)[2])


def test_create_for_model_records_the_registered_model_without_building_it(tmp_path):
    """The model entry and spec of ``build_model(...)``, built on the meta device: the
    global random state is untouched (the experts stage and TrajectoryRecorder use it)."""
    torch.manual_seed(3)
    store = TrajectoryStore.create_for_model(
        tmp_path / "s", name="ConvNet", channels=1, num_classes=10, image_size=(8, 8),
        model_kwargs={"width": 4, "depth": 2}, num_snapshots=3, dataset="digits",
        input_space=INPUT, hparams={"lr": 0.01})
    drawn = torch.rand(4)
    torch.manual_seed(3)
    assert torch.equal(drawn, torch.rand(4))
    net = ld_models.build_model("ConvNet", 1, 10, 8, width=4, depth=2)
    assert store.model == net.model_config
    assert store.spec == ParamSpec.of(net) and store.num_snapshots == 3
    store.check_model(store.build_model())
    # the same call again opens it (create's identity rule: int image_size == [8, 8])
    again = TrajectoryStore.create_for_model(
        tmp_path / "s", name="ConvNet", channels=1, num_classes=10, image_size=8,
        model_kwargs={"width": 4, "depth": 2}, num_snapshots=3, dataset="digits",
        input_space=INPUT, hparams={"lr": 0.01})
    assert again.meta == store.meta
