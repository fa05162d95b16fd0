"""InputSpace: dict form, the one matching rule, and files written before it existed.

The fixtures under tests/data/fixtures/ were written by the code of branch main
(tests/data/fixtures/make_main_fixtures.py says how), not by hand.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lightning_distill.data import InputSpace, RealDataModule, SyntheticSet
from lightning_distill.data.synthetic import input_spaces_match
from lightning_distill.trajectories import TrajectoryStore, TrajectoryStoreError

FIXTURES = Path(__file__).parent / "fixtures"
CIFAR = InputSpace.meanstd("cifar10", (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
ZCA = InputSpace.zca("cifar10", "3f1c0e9a5b7d2e64", 0.1)


# ------------------------------------------------------------------ the type
def test_dict_form_is_the_six_keys():
    assert CIFAR.to_dict() == {
        "dataset": "cifar10", "normalization": "meanstd", "mean": [0.4914, 0.4822, 0.4465],
        "std": [0.2023, 0.1994, 0.2010], "zca_fingerprint": None, "zca_regularization": None}
    assert list(ZCA.to_dict()) == ["dataset", "normalization", "mean", "std",
                                   "zca_fingerprint", "zca_regularization"]
    assert InputSpace().to_dict() == {} and not InputSpace().known and ZCA.known
    for space in (CIFAR, ZCA, InputSpace()):
        assert InputSpace.from_dict(space.to_dict()) == space
        assert InputSpace.from_dict(json.loads(json.dumps(space.to_dict()))) == space
    assert InputSpace.from_dict(None) == InputSpace() == InputSpace.from_dict({})


def test_frozen_hashable_and_a_read_only_mapping():
    with pytest.raises(AttributeError):
        CIFAR.dataset = "other"  # type: ignore[misc]
    assert hash(CIFAR) == hash(InputSpace.from_dict(CIFAR.to_dict()))
    assert CIFAR["normalization"] == "meanstd" and dict(CIFAR) == CIFAR.to_dict()
    assert CIFAR == CIFAR.to_dict() and ZCA != CIFAR and len(InputSpace()) == 0
    assert "mean=(0.4914" in repr(CIFAR) and "zca_fingerprint" not in repr(CIFAR)


def test_other_keys_are_kept_and_compared():
    raw = {"normalize": {"mean": [0.5], "std": [0.25]}, "zca": None}
    space = InputSpace.from_dict(raw)
    assert space.to_dict() == raw and not space.normalization
    assert space != InputSpace.from_dict({**raw, "zca": "abc"})
    assert space.matches({**raw, "zca": "abc"})  # None on one side: nothing to compare
    assert not space.matches({**raw, "normalize": "other"})


def test_bad_fields_are_refused():
    with pytest.raises(ValueError, match="mean must be a list of numbers"):
        InputSpace.from_dict({"mean": ["a"]})
    with pytest.raises(ValueError, match="normalization must be a string"):
        InputSpace(normalization=3)  # type: ignore[arg-type]


# ------------------------------------------------------------------ the rule
def test_one_rule_for_every_field():
    assert CIFAR.matches(CIFAR) and CIFAR.matches(InputSpace()) and InputSpace().matches(ZCA)
    assert CIFAR.mismatch(ZCA) == "normalization = 'meanstd' vs 'zca'"
    assert ZCA.mismatch({**ZCA.to_dict(), "zca_fingerprint": "x"}) == (
        "zca_fingerprint = '3f1c0e9a5b7d2e64' vs 'x'")
    assert ZCA.mismatch({**ZCA.to_dict(), "dataset": "cifar100"}).startswith("dataset = ")
    assert not ZCA.matches({**ZCA.to_dict(), "zca_regularization": 0.2})
    # mean / std: numerically, relative tolerance 1e-5; tuples and lists alike
    assert CIFAR.matches({"mean": (0.4914 * (1 + 1e-7), 0.4822, 0.4465)})
    assert not CIFAR.matches({"mean": [0.4914 * 1.001, 0.4822, 0.4465]})
    assert not CIFAR.matches({"std": [0.2023]})
    # the same rule behind SyntheticSet.check_compatible's old helper
    assert input_spaces_match(None, {"normalization": "zca"})
    assert not input_spaces_match({"zca_fingerprint": "a"}, {"zca_fingerprint": "b"})


def test_datamodule_space(tmp_path):
    dm = RealDataModule("digits")
    dm.setup()
    assert isinstance(dm.input_space, InputSpace)
    assert dm.input_space == InputSpace.meanstd("digits", dm.real.mean, dm.real.std)
    dmz = RealDataModule("digits", zca=True)
    dmz.setup()
    assert dmz.input_space == InputSpace.zca("digits", dmz.zca.fingerprint, 0.1)
    assert dmz.input_space.mismatch(dm.input_space) == "normalization = 'zca' vs 'meanstd'"


# ------------------------------------------------------------------ old files
def _copy(name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURES / name, tmp_path / name))


def test_old_store_meta_loads_and_resumes(tmp_path):
    path = _copy("main_store_meanstd", tmp_path)
    written = json.loads((path / "meta.json").read_text())["input_space"]
    store = TrajectoryStore.open(path)
    assert isinstance(store.input_space, InputSpace)
    assert store.input_space.to_dict() == written  # lossless
    assert store.input_space.normalization == "meanstd" and store.input_space.dataset == "digits"
    dm = RealDataModule("digits")
    dm.setup()
    assert store.input_space.matches(dm.input_space)
    assert store.load_expert(0).shape == (3, store.num_params)
    kw = dict(spec=store.spec, num_snapshots=3, model=store.model, dataset="digits",
              hparams={"seed": 0})
    # a resumed run with the same input space (as an InputSpace or as the old dict) reuses it
    for space in (InputSpace.from_dict(written), written):
        again = TrajectoryStore.create(path, input_space=space, **kw)
        assert again.meta["created"] == store.meta["created"]
    with pytest.raises(TrajectoryStoreError, match="field 'input_space' differs"):
        TrajectoryStore.create(path, input_space=InputSpace.zca("digits", "abc", 0.1), **kw)


def test_old_store_with_unknown_space(tmp_path):
    path = _copy("main_store_unknown", tmp_path)
    store = TrajectoryStore.open(path)
    assert store.input_space == InputSpace() and not store.input_space
    TrajectoryStore.create(path, spec=store.spec, num_snapshots=3, model=store.model,
                           dataset="digits", hparams={"seed": 0})  # None: unknown as before


def test_old_synthetic_set_loads(tmp_path):
    syn = SyntheticSet.load(FIXTURES / "main_synthetic_zca.pt")
    written = torch.load(FIXTURES / "main_synthetic_zca.pt", weights_only=True)["meta"]
    space = syn.input_space
    assert isinstance(space, InputSpace) and space.to_dict() == written["input_space"]
    assert space.normalization == "zca" and space.zca_regularization == 0.1
    assert syn.soft and syn.lr == pytest.approx(0.02) and syn.meta["iteration"] == 5
    syn.check_compatible(channels=1, image_size=8, num_classes=10,
                         input_space=written["input_space"])
    with pytest.raises(ValueError, match=r"input space mismatch \(zca_fingerprint = "):
        syn.check_compatible(channels=1, image_size=8, num_classes=10,
                             input_space={**written["input_space"], "zca_fingerprint": "x"})
    with pytest.raises(ValueError, match=r"input space mismatch \(normalization = 'zca' vs"):
        syn.check_compatible(channels=1, image_size=8, num_classes=10,
                             input_space=InputSpace.meanstd("digits", [0.3], [0.4]))
    # saved again by this code, the file holds the same input-space dict
    again = SyntheticSet.load(syn.save(tmp_path / "again.pt", grid=False))
    assert again.meta["input_space"] == written["input_space"]


def test_synthetic_set_with_an_input_space_object_saves_a_plain_dict(tmp_path):
    syn = SyntheticSet(torch.zeros(2, 1, 2, 2), torch.tensor([0, 1]), 0.1,
                       {"input_space": ZCA})
    path = syn.save(tmp_path / "s.pt", grid=False)
    meta = torch.load(path, weights_only=True)["meta"]
    assert type(meta["input_space"]) is dict and meta["input_space"] == ZCA.to_dict()
    assert SyntheticSet.load(path).input_space == ZCA
