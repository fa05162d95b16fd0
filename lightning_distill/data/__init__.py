"""Real data sets, their input space (normalisation / ZCA), DSA and synthetic sets."""

from .augment import DSA, DSAParams
from .datamodule import RealDataModule
from .datasets import RealDataset, get_dataset, list_datasets, register_dataset
from .zca import ZCA

__all__ = [
    "DSA",
    "DSAParams",
    "RealDataModule",
    "RealDataset",
    "ZCA",
    "get_dataset",
    "list_datasets",
    "register_dataset",
]
