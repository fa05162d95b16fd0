"""SyntheticSet: file round trip, PNG grid, clear errors, compatibility checks, from_real."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from lightning_distill.data.synthetic import FORMAT_VERSION, SyntheticSet, input_spaces_match


def _hard_set(k: int = 3, ipc: int = 2, c: int = 1, hw: int = 8) -> SyntheticSet:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(k * ipc, c, hw, hw, generator=g)
    labels = torch.arange(k).repeat_interleave(ipc)
    meta = {"dataset": "digits", "ipc": ipc, "num_classes": k,
            "input_space": {"normalization": "meanstd", "mean": [0.5], "std": [0.25]},
            "source_store": "runs/experts", "iteration": 7}
    return SyntheticSet(images, labels, 0.0123456789, meta)


def test_properties_hard_and_soft():
    s = _hard_set()
    assert not s.soft and s.ipc == 2 and s.num_classes == 3 and len(s) == 6
    assert s.channels == 1 and s.image_size == (8, 8)
    assert torch.equal(s.class_ids, torch.tensor([0, 0, 1, 1, 2, 2]))
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0]])
    soft = SyntheticSet(torch.zeros(2, 1, 4, 4), logits, torch.tensor(0.02))
    assert soft.soft and soft.num_classes == 3 and soft.lr == pytest.approx(0.02)
    assert torch.equal(soft.class_ids, torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        SyntheticSet(torch.zeros(3, 1, 4, 4), torch.tensor([0, 1]))


@pytest.mark.parametrize("soft", [False, True])
def test_save_load_round_trip_bit_identical(tmp_path, soft):
    s = _hard_set()
    if soft:
        logits = 3.0 * torch.nn.functional.one_hot(s.labels, 3) + 0.1 * torch.randn(6, 3)
        s = SyntheticSet(s.images, logits.float(), s.lr, s.meta)
    path = s.save(tmp_path / "sub" / "set.pt")
    assert path == tmp_path / "sub" / "set.pt"
    png = tmp_path / "sub" / "set.png"
    assert png.is_file()
    # the raw file is a plain dict readable with weights_only=True
    raw = torch.load(path, weights_only=True)
    assert raw["format_version"] == FORMAT_VERSION
    # the artifacts' header (docs/formats.md, 'Header')
    assert raw["format"] == raw["kind"] == "lightning_distill.SyntheticSet"
    assert raw["library_version"] and raw["created"] == raw["meta"]["created"]
    assert raw["input_space"] == raw["meta"].get("input_space")
    t = SyntheticSet.load(path)
    assert torch.equal(t.images, s.images) and t.images.dtype == s.images.dtype
    assert torch.equal(t.labels, s.labels) and t.labels.dtype == s.labels.dtype
    assert t.lr == s.lr  # exact float
    for key, value in s.meta.items():
        assert t.meta[key] == value
    assert t.meta["path"] == str(path) and "created" in t.meta
    assert t.meta["channels"] == 1 and t.meta["image_size"] == [8, 8]
    # grid: one row per class (3), ipc columns (2), 8 px images enlarged 8x to 64 px
    # tiles (nearest neighbour), 2 px padding
    with Image.open(png) as im:
        assert im.size == (2 * 66 + 2, 3 * 66 + 2)
    # no temporary files are left behind
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["set.png", "set.pt"]


def test_grid_uses_to_pixels_or_minmax():
    images = torch.stack([torch.full((1, 2, 2), 0.25), torch.tensor([[[0.0, 1.0], [2.0, 4.0]]])])
    s = SyntheticSet(images, torch.tensor([0, 1]))
    g = s.grid_tensor(to_pixels=lambda x: x * 2, padding=0, min_image_side=1)  # 1 column, 2 rows
    assert g.shape == (3, 4, 2)
    assert torch.allclose(g[0, :2], torch.full((2, 2), 0.5))
    assert torch.allclose(g[0, 2:], torch.tensor([[0.0, 1.0], [1.0, 1.0]]))  # clamped to [0, 1]
    g = s.grid_tensor(padding=0, min_image_side=1)  # per-image min-max scaling
    assert torch.allclose(g[0, 2:], torch.tensor([[0.0, 0.25], [0.5, 1.0]]))
    assert torch.allclose(g[0, :2], torch.zeros(2, 2))  # a constant image maps to 0


def test_load_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        SyntheticSet.load(missing)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"this is not a torch file")
    with pytest.raises(ValueError, match=r"cannot read synthetic set file .*corrupt\.pt"):
        SyntheticSet.load(corrupt)
    # a truncated real file
    good = _hard_set().save(tmp_path / "good.pt", grid=False)
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match="trunc.pt"):
        SyntheticSet.load(trunc)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match="other.pt: not a lightning_distill.SyntheticSet file"):
        SyntheticSet.load(other)
    nolr = tmp_path / "nolr.pt"
    payload = _hard_set().to_dict()
    del payload["lr"]
    torch.save(payload, nolr)
    with pytest.raises(ValueError, match=r"nolr.pt.*missing key\(s\) \['lr'\]"):
        SyntheticSet.load(nolr)
    bad = tmp_path / "bad.pt"
    payload = _hard_set().to_dict()
    payload["labels"] = payload["labels"][:5]
    torch.save(payload, bad)
    with pytest.raises(ValueError, match="bad.pt: label count mismatch: 6 images but 5 labels"):
        SyntheticSet.load(bad)
    newer = tmp_path / "newer.pt"
    payload = _hard_set().to_dict()
    payload["format_version"] = FORMAT_VERSION + 1
    torch.save(payload, newer)
    with pytest.raises(ValueError, match="newer than lightning_distill .* reads"):
        SyntheticSet.load(newer)


@pytest.mark.parametrize("where, value", [("images", float("nan")), ("images", float("inf")),
                                          ("labels", float("nan")), ("labels", -float("inf"))])
def test_load_refuses_non_finite_images_or_labels(tmp_path, where, value):
    s = _hard_set()
    if where == "labels":  # soft labels (logits) can be non-finite; hard ones cannot
        s = SyntheticSet(s.images, torch.randn(6, 3), s.lr, s.meta)
    getattr(s, where).view(-1)[4] = value
    path = s.save(tmp_path / "diverged.pt", grid=False)  # save writes what it is given
    with pytest.raises(ValueError, match=rf"diverged\.pt: the synthetic {where} hold 1 NaN or "
                       r"inf value\(s\).*use a set saved before the divergence"):
        SyntheticSet.load(path)
    # the same check on an in-memory set, and a finite set passes
    with pytest.raises(ValueError, match=f"my set: the synthetic {where}"):
        s.check_finite("my set")
    _hard_set().check_finite()
    SyntheticSet.load(_hard_set().save(tmp_path / "fine.pt", grid=False))


def test_check_compatible_names_field_and_values():
    s = _hard_set()  # 1 channel, 8x8, 3 classes
    s.check_compatible(channels=1, image_size=8, num_classes=3)
    s.check_compatible(channels=1, image_size=(8, 8), num_classes=3,
                       input_space={"normalization": "meanstd", "mean": (0.5,), "std": (0.25,)})
    with pytest.raises(ValueError, match="channels mismatch.*1 channels.*has 3"):
        s.check_compatible(channels=3, image_size=8, num_classes=3)
    with pytest.raises(ValueError, match=r"image size mismatch.*\(8, 8\).*\(28, 28\)"):
        s.check_compatible(channels=1, image_size=28, num_classes=3)
    with pytest.raises(ValueError, match="classes mismatch.*3 classes.*has 10"):
        s.check_compatible(channels=1, image_size=8, num_classes=10)
    with pytest.raises(ValueError, match="input space mismatch"):
        s.check_compatible(channels=1, image_size=8, num_classes=3,
                           input_space={"normalization": "meanstd", "mean": [0.4], "std": [0.25]})
    with pytest.raises(ValueError, match="input space mismatch"):
        s.check_compatible(channels=1, image_size=8, num_classes=3,
                           input_space={"normalization": "zca", "zca_fingerprint": "abc"})
    assert input_spaces_match(None, {"normalization": "zca"})
    assert input_spaces_match({"normalization": "zca", "zca_fingerprint": "a"},
                              {"normalization": "zca"})
    assert not input_spaces_match({"zca_fingerprint": "a"}, {"zca_fingerprint": "b"})


def test_from_real_picks_ipc_per_class_without_duplicates():
    g = torch.Generator().manual_seed(1)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 0])  # counts 5, 4, 3
    images = torch.arange(12, dtype=torch.float32).reshape(12, 1, 1, 1).expand(12, 1, 2, 2)
    s = SyntheticSet.from_real(images, labels, ipc=3, num_classes=3, generator=g, lr=0.05,
                               meta={"dataset": "toy"})
    assert s.lr == 0.05 and s.ipc == 3 and s.num_classes == 3 and s.meta["dataset"] == "toy"
    assert s.meta["source"] == "random_real"
    assert torch.equal(s.labels, torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2]))
    picked = s.images[:, 0, 0, 0].long()
    assert len(set(picked.tolist())) == 9  # no duplicates
    assert torch.equal(labels[picked], s.labels)  # every image comes from its class
    assert sorted(picked[6:].tolist()) == [2, 5, 8]  # class 2 has exactly 3 images
    # reproducible with the same generator seed, different with another
    s2 = SyntheticSet.from_real(images, labels, 3, 3, torch.Generator().manual_seed(1))
    assert torch.equal(s2.images, s.images)
    with pytest.raises(ValueError, match="class 2 has only 3 images, fewer than ipc=4"):
        SyntheticSet.from_real(images, labels, 4, 3, torch.Generator().manual_seed(1))
