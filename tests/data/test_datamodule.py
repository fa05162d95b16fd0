"""RealDataModule on scikit-learn digits: splits, normalisation, ZCA, loaders."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_distill.data.datamodule import RealDataModule


@pytest.fixture(scope="module")
def dm():
    m = RealDataModule("digits", batch_size=100, val_fraction=0.1, split_seed=0)
    m.setup()
    return m


@pytest.fixture(scope="module")
def dmz():
    m = RealDataModule("digits", batch_size=64, val_fraction=0.1, split_seed=0, zca=True)
    m.setup("fit")
    return m


def test_splits_sizes_stratified_and_labels(dm):
    real = dm.real
    counts = real.train_labels.bincount(minlength=10)
    expected_val = [round(0.1 * int(n)) for n in counts]
    assert dm.val_set.tensors[1].bincount(minlength=10).tolist() == expected_val
    assert len(dm.train_set) + len(dm.val_set) == 1198 and len(dm.test_set) == 599
    assert torch.equal(dm.train_set.tensors[1], real.train_labels[dm.train_idx])
    assert torch.equal(dm.val_set.tensors[1], real.train_labels[dm.val_idx])
    assert torch.equal(dm.test_set.tensors[1], real.test_labels)
    both = torch.cat([dm.train_idx, dm.val_idx]).sort().values
    assert torch.equal(both, torch.arange(1198))
    assert (dm.num_classes, dm.channels, dm.image_size) == (10, 1, (8, 8))
    for t in (dm.train_set, dm.val_set, dm.test_set):
        assert t.tensors[0].dtype == torch.float32 and t.tensors[0].device.type == "cpu"


def test_split_is_seeded(dm):
    same = RealDataModule("digits", val_fraction=0.1, split_seed=0)
    same.setup()
    other = RealDataModule("digits", val_fraction=0.1, split_seed=1)
    other.setup()
    assert torch.equal(same.val_idx, dm.val_idx)
    assert not torch.equal(other.val_idx, dm.val_idx)


def test_meanstd_normalisation(dm):
    real = dm.real
    x = torch.cat([dm.train_set.tensors[0], dm.val_set.tensors[0]]).double()
    # the digits constants are the statistics of the whole training split
    assert x.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert x.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-6)
    raw = real.images("train", dm.train_idx)
    expect = (raw - real.mean[0]) / real.std[0]
    assert torch.allclose(dm.train_set.tensors[0], expect, atol=1e-6)
    assert torch.allclose(dm.from_input_space(dm.to_input_space(raw)), raw, atol=1e-4)
    assert dm.input_space == {
        "dataset": "digits",
        "normalization": "meanstd",
        "mean": list(real.mean),
        "std": list(real.std),
        "zca_fingerprint": None,
        "zca_regularization": None,
    }


def test_zca_whitens_training_part_only(dmz):
    real = dmz.real
    x01 = real.images("train", dmz.train_idx).reshape(-1, 64).double()
    xc = x01 - x01.mean(0)
    s, u = torch.linalg.eigh(xc.T @ xc / (x01.shape[0] - 1))
    expected = (u * (s / (s + 0.1))) @ u.T  # docs/method.md, ZCA: W S W = U diag(s/(s+0.1)) U^T
    z = dmz.train_set.tensors[0].reshape(-1, 64).double()
    zc = z - z.mean(0)
    cov = zc.T @ zc / (z.shape[0] - 1)
    assert z.mean(0).abs().max().item() < 1e-5
    assert torch.allclose(cov, expected, atol=1e-4)
    assert torch.linalg.eigvalsh(cov).max().item() < 1.0
    # the same transform on validation and test
    test01 = real.images("test")
    assert torch.allclose(dmz.test_set.tensors[0], dmz.zca.transform(test01), atol=1e-6)
    assert torch.allclose(dmz.from_input_space(dmz.to_input_space(test01)), test01, atol=1e-4)
    space = dmz.input_space
    assert space["normalization"] == "zca" and space["mean"] is None
    assert space["zca_fingerprint"] == dmz.zca.fingerprint and space["zca_regularization"] == 0.1


def test_zca_fit_excludes_validation(dmz):
    from lightning_distill.data.zca import ZCA

    real = dmz.real
    part = ZCA(0.1).fit(real.images("train", dmz.train_idx))
    whole = ZCA(0.1).fit(real.images("train"))
    assert part.fingerprint == dmz.zca.fingerprint != whole.fingerprint


def test_dataloaders_batches_and_seeded_shuffle(dm):
    n = len(dm.train_set)
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == math.ceil(n / 100)
    assert batches[0][0].shape == (100, 1, 8, 8) and batches[0][1].shape == (100,)
    assert batches[-1][0].shape[0] == n - 100 * (len(batches) - 1)
    # one epoch is a permutation of the training part, the same for every fresh loader
    seen = torch.cat([b[1] for b in batches])
    assert torch.equal(seen.sort().values, dm.train_set.tensors[1].sort().values)
    again = torch.cat([b[1] for b in dm.train_dataloader()])
    assert torch.equal(seen, again)
    assert not torch.equal(seen, dm.train_set.tensors[1])  # shuffled
    val = list(dm.val_dataloader())
    assert torch.equal(torch.cat([b[0] for b in val]), dm.val_set.tensors[0])  # in order
    test = next(iter(dm.test_dataloader()))
    assert test[0].shape == (100, 1, 8, 8)


def test_images_of_class_from_training_part(dm):
    x, y = dm.train_set.tensors
    g = torch.Generator().manual_seed(4)
    imgs = dm.images_of_class(3, n=5, generator=g)
    idx = torch.nonzero(y == 3).flatten()
    pick = idx[torch.randperm(idx.numel(), generator=torch.Generator().manual_seed(4))[:5]]
    assert torch.equal(imgs, x[pick])
    assert torch.equal(dm.images_of_class(3), x[idx])
    with pytest.raises(ValueError, match="has only"):
        dm.images_of_class(3, n=idx.numel() + 1)


def test_setup_is_idempotent_and_errors():
    m = RealDataModule("digits", val_fraction=0.0)
    with pytest.raises(RuntimeError, match="setup"):
        m.train_dataloader()
    m.setup()
    first = m.train_set
    m.setup("test")
    assert m.train_set is first and len(m.val_set) == 0 and len(first) == 1198
    with pytest.raises(ValueError, match="val_fraction"):
        RealDataModule("digits", val_fraction=1.0)
    assert m.hparams["name"] == "digits" and m.hparams["val_fraction"] == 0.0


@pytest.mark.filterwarnings("ignore:.*no `validation_step`")
def test_fits_in_a_lightning_trainer(dm):
    import pytorch_lightning as pl

    class Probe(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(64, 10)
            self.shapes = []

        def training_step(self, batch, _):
            x, y = batch
            self.shapes.append(tuple(x.shape))
            return torch.nn.functional.cross_entropy(self.fc(x.flatten(1)), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    probe = Probe()
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=0,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(probe, datamodule=dm)
    assert probe.shapes == [(100, 1, 8, 8), (100, 1, 8, 8)]


# ------------------------------------------------------------- batched loader
def _batches(loader, epochs: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [b for _ in range(epochs) for b in loader]


def test_batched_loader_equals_dataloader_for_same_seed(dm):
    from torch.utils.data import DataLoader

    from lightning_distill.data.datamodule import TensorBatchLoader

    assert dm.loader == "batched"
    x, y = dm.train_set.tensors
    n = x.shape[0]
    assert n % 100 != 0  # a partial last batch is compared too
    ours = dm.train_dataloader()
    assert isinstance(ours, TensorBatchLoader) and len(ours) == math.ceil(n / 100)
    ref = RealDataModule("digits", batch_size=100, val_fraction=0.1, split_seed=0,
                         loader="dataloader")
    ref.setup()
    theirs = ref.train_dataloader()
    assert isinstance(theirs, DataLoader) and len(theirs) == len(ours)
    a, b = _batches(ours, 2), _batches(theirs, 2)  # generator advances across epochs
    assert len(a) == len(b) == 2 * len(ours)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    epoch0 = torch.cat([yb for _, yb in a[: len(ours)]])
    epoch1 = torch.cat([yb for _, yb in a[len(ours) :]])
    assert not torch.equal(epoch0, epoch1)  # reshuffled
    # shuffle_seed: a fresh generator per call, identical on both paths
    dm.shuffle_seed = ref.shuffle_seed = 7
    try:
        for (xa, ya), (xb, yb) in zip(dm.train_dataloader(), ref.train_dataloader(), strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
        g = torch.Generator().manual_seed(7)
        torch.empty((), dtype=torch.int64).random_(generator=g)  # DataLoader's base seed
        first = torch.randperm(n, generator=g)[:100]
        assert torch.equal(next(iter(dm.train_dataloader()))[1], y[first])
    finally:
        dm.shuffle_seed = ref.shuffle_seed = None


def test_batched_val_test_in_order_and_lengths(dm):
    val, test = dm.val_dataloader(), dm.test_dataloader()
    nv, nt = len(dm.val_set), len(dm.test_set)
    assert len(val) == math.ceil(nv / 100) and len(test) == math.ceil(nt / 100)
    for loader, ds in ((val, dm.val_set), (test, dm.test_set)):
        bs = list(loader)
        assert [b[0].shape[0] for b in bs] == [min(100, len(ds) - 100 * i) for i in range(len(bs))]
        assert torch.equal(torch.cat([b[0] for b in bs]), ds.tensors[0])
        assert torch.equal(torch.cat([b[1] for b in bs]), ds.tensors[1])
        assert not bs[0][0].is_pinned() or torch.cuda.is_available()


def test_tensor_batch_loader_small_by_hand():
    from lightning_distill.data.datamodule import TensorBatchLoader

    x = torch.arange(7.0).view(7, 1)
    y = torch.arange(7)
    loader = TensorBatchLoader(x, y, batch_size=3, pin_memory=False)
    assert len(loader) == 3
    assert [b[1].tolist() for b in loader] == [[0, 1, 2], [3, 4, 5], [6]]
    assert [b[0].flatten().tolist() for b in loader][-1] == [6.0]
    with pytest.raises(ValueError, match="same length"):
        TensorBatchLoader(x, y[:3], batch_size=2)
    with pytest.raises(ValueError, match="loader must be"):
        RealDataModule("digits", loader="fast")
    assert RealDataModule("digits", num_workers=2).loader == "dataloader"


def test_shard_indices_match_distributed_sampler():
    from torch.utils.data.distributed import DistributedSampler

    from lightning_distill.data.datamodule import shard_indices

    order = torch.tensor([4, 0, 3, 1, 2])
    assert shard_indices(order, 0, 2).tolist() == [4, 3, 2]
    assert shard_indices(order, 1, 2).tolist() == [0, 1, 4]  # padded by wrapping: 4
    assert shard_indices(order, 2, 8).tolist() == [3]
    assert shard_indices(order, 5, 8).tolist() == [4]  # 5 -> 8: order, then order[:3]
    assert shard_indices(order, 7, 8).tolist() == [3]
    assert torch.equal(shard_indices(order, 0, 1), order)
    for n, world in ((10, 3), (5, 8), (12, 4), (1, 2)):
        ds = list(range(n))
        for rank in range(world):
            s = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=False)
            assert shard_indices(torch.arange(n), rank, world).tolist() == list(s)
    with pytest.raises(ValueError, match="rank"):
        shard_indices(order, 2, 2)


def test_batched_loader_shards_under_fake_ddp(monkeypatch):
    import lightning_distill.data.datamodule as mod

    x = torch.arange(10.0).view(10, 1)
    y = torch.arange(10)
    seen = []
    for rank in range(3):
        monkeypatch.setattr(mod, "_dist_rank_world", lambda r=rank: (r, 3))
        loader = mod.TensorBatchLoader(x, y, 2, shuffle=True,
                                       generator=torch.Generator().manual_seed(5))
        assert len(loader) == 2  # ceil(10 / 3) = 4 samples -> 2 batches
        seen.append(torch.cat([b[1] for b in loader]))
    g = torch.Generator().manual_seed(5)
    torch.empty((), dtype=torch.int64).random_(generator=g)
    perm = torch.randperm(10, generator=g)
    padded = torch.cat([perm, perm[:2]])
    for rank in range(3):
        assert seen[rank].tolist() == padded[rank::3].tolist()
    assert sorted(torch.cat(seen)[:10].tolist()) != [] and set(torch.cat(seen).tolist()) == set(
        range(10))


def test_loader_argument_and_cli():
    pytest.importorskip("jsonargparse")
    from lightning_distill.cli import parse_lightning_config
    from lightning_distill.stages.distill import init_args

    assert RealDataModule("digits").loader == "batched"
    assert RealDataModule("digits", loader="dataloader").loader == "dataloader"
    assert RealDataModule("digits", num_workers=1).loader == "dataloader"

    cfg = parse_lightning_config(["experts", "--data.loader", "dataloader"])
    assert init_args(cfg.data).loader == "dataloader"
    assert init_args(parse_lightning_config(["experts"]).data).loader == "batched"


@pytest.mark.parametrize("n,batch", [(12, 4), (10, 4), (3, 5)])
def test_tensor_batch_loader_equals_dataloader_over_epochs(n, batch):
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_distill.data.datamodule import TensorBatchLoader

    x, y = torch.randn(n, 2, generator=torch.Generator().manual_seed(0)), torch.arange(n)
    ours = TensorBatchLoader(x, y, batch, shuffle=True, generator=torch.Generator().manual_seed(9),
                             pin_memory=False)
    ref = DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True,
                     generator=torch.Generator().manual_seed(9))
    assert len(ours) == len(ref) == math.ceil(n / batch)
    a, b = _batches(ours, 3), _batches(ref, 3)
    assert [t[1].tolist() for t in a] == [t[1].tolist() for t in b]
    assert all(torch.equal(s[0], t[0]) for s, t in zip(a, b, strict=True))


# ------------------------------------------------------------- data selection
@pytest.mark.parametrize("n,batch", [(12, 4), (10, 3)])
def test_batched_loader_subset_equals_dataloader_over_the_subset(n, batch):
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_distill.data.datamodule import TensorBatchLoader

    x, y = torch.randn(n, 2, generator=torch.Generator().manual_seed(0)), torch.arange(n)
    idx = torch.tensor([1, 2, 5, 7, 8, 9, 11]) if n == 12 else torch.tensor([0, 3, 4, 6, 9])
    ours = TensorBatchLoader(x, y, batch, shuffle=True, generator=torch.Generator().manual_seed(3),
                             pin_memory=False, indices=idx)
    ref = DataLoader(TensorDataset(x[idx], y[idx]), batch_size=batch, shuffle=True,
                     generator=torch.Generator().manual_seed(3))
    assert len(ours) == len(ref) == math.ceil(idx.numel() / batch)
    a, b = _batches(ours, 3), _batches(ref, 3)
    assert [t[1].tolist() for t in a] == [t[1].tolist() for t in b]
    assert all(torch.equal(s[0], t[0]) for s, t in zip(a, b, strict=True))
    unshuffled = TensorBatchLoader(x, y, batch, pin_memory=False, indices=idx)
    assert torch.cat([t[1] for t in unshuffled]).tolist() == idx.tolist()
    with pytest.raises(ValueError, match="indices must lie"):
        TensorBatchLoader(x, y, batch, indices=torch.tensor([0, n]))


def test_batched_loader_shards_the_subset_under_fake_ddp(monkeypatch):
    import lightning_distill.data.datamodule as mod

    x, y = torch.arange(10.0).view(10, 1), torch.arange(10)
    idx = torch.tensor([0, 2, 3, 5, 6, 9, 1])  # 7 of 10, any order
    seen = []
    for rank in range(2):
        monkeypatch.setattr(mod, "_dist_rank_world", lambda r=rank: (r, 2))
        loader = mod.TensorBatchLoader(x, y, 3, shuffle=True, indices=idx,
                                       generator=torch.Generator().manual_seed(5))
        assert len(loader) == 2  # ceil(7 / 2) = 4 samples -> 2 batches of 3
        seen.append(torch.cat([b[1] for b in loader]))
    g = torch.Generator().manual_seed(5)
    torch.empty((), dtype=torch.int64).random_(generator=g)
    order = idx[torch.randperm(7, generator=g)]
    padded = torch.cat([order, order[:1]])
    for rank in range(2):
        assert seen[rank].tolist() == padded[rank::2].tolist()
    assert set(torch.cat(seen).tolist()) == set(idx.tolist())


@pytest.mark.parametrize("loader", ["batched", "dataloader"])
def test_train_selection_serves_the_epochs_subset_in_an_epoch_seeded_order(loader):
    from lightning_distill.seeding import derive_seed

    m = RealDataModule("digits", batch_size=64, val_fraction=0.1, split_seed=0, loader=loader,
                       shuffle_seed=11)
    m.setup()
    n = len(m.train_set)
    _, y = m.train_set.tensors
    m.train_selection = lambda e: torch.arange(e, n, 3)  # a different subset per epoch

    class FakeTrainer:
        current_epoch = 0

    m.trainer = FakeTrainer()
    try:
        seen = {}
        for e in (0, 1, 2):
            FakeTrainer.current_epoch = e
            batches = list(m.train_dataloader())
            labels = torch.cat([b[1] for b in batches])
            assert len(labels) == len(range(e, n, 3))
            assert sorted(labels.tolist()) == sorted(y[e::3].tolist())
            seen[e] = labels
        # the order is a pure function of the epoch: the same loader again, epoch 1
        FakeTrainer.current_epoch = 1
        assert torch.equal(torch.cat([b[1] for b in m.train_dataloader()]), seen[1])
        if loader == "batched":  # order = subset[randperm(m)] from derive_seed(11, epoch)
            g = torch.Generator().manual_seed(derive_seed(11, 1))
            torch.empty((), dtype=torch.int64).random_(generator=g)
            sub = torch.arange(1, n, 3)
            assert torch.equal(seen[1], y[sub[torch.randperm(sub.numel(), generator=g)]])
        m.train_selection = lambda e: torch.empty(0, dtype=torch.long)
        with pytest.raises(ValueError, match="keeps no training sample"):
            m.train_dataloader()
        m.train_selection = lambda e: torch.tensor([n])
        with pytest.raises(ValueError, match="must lie in"):
            m.train_dataloader()
    finally:
        m.trainer = None
    m.train_selection = None  # off again: the plain loader
    assert len(torch.cat([b[1] for b in m.train_dataloader()])) == n


def test_setup_says_what_it_loads_fits_and_how_long_it_took(caplog):
    """Loading, ZCA fitting and transforming are not a silent pause: rank 0 logs each."""
    import logging

    with caplog.at_level(logging.INFO):
        RealDataModule("digits", zca=True, val_fraction=0.1).setup("fit")
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "data: loading digits" in text
    assert "data: fitting ZCA on 1078 training images (regularization 0.1)" in text
    assert "1078 train / 120 validation / 599 test images, 1x8x8" in text and "ZCA-whitened" in text


def test_val_fraction_zero_fits_and_periodic_evaluation_refuses():
    """val_fraction 0 (the references' use of the whole training set): an expert fits on
    all of the training set with an empty validation split, and PeriodicEvaluation,
    which would have nothing to choose on, refuses with what to do."""
    import pytorch_lightning as pl

    from lightning_distill.callbacks import PeriodicEvaluation
    from lightning_distill.modules.expert import ExpertTrajectoryModule

    dm = RealDataModule("digits", val_fraction=0.0, batch_size=256)
    dm.setup("fit")
    assert len(dm.train_set) == 1198 and len(dm.val_set) == 0
    module = ExpertTrajectoryModule(model="ConvNet", model_kwargs={"width": 4, "depth": 2},
                                    lr=0.01)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(module, datamodule=dm)
    assert trainer.current_epoch == 1
    with pytest.raises(ValueError, match="no validation data.*val_fraction > 0"):
        PeriodicEvaluation(runs=1).setup(trainer, module, "fit")
