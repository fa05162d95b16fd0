"""RealDataModule on scikit-learn digits: splits, normalisation, ZCA, loaders."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_distill.data.datamodule import RealDataModule


@pytest.fixture(scope="module")
def dm():
    m = RealDataModule("digits", batch_size=100, val_fraction=0.1, seed=0)
    m.setup()
    return m


@pytest.fixture(scope="module")
def dmz():
    m = RealDataModule("digits", batch_size=64, val_fraction=0.1, seed=0, zca=True)
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
    same = RealDataModule("digits", val_fraction=0.1, seed=0)
    same.setup()
    other = RealDataModule("digits", val_fraction=0.1, seed=1)
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
    expected = (u * (s / (s + 0.1))) @ u.T  # REFERENCE 2: W S W = U diag(s/(s+0.1)) U^T
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
