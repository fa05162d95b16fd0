"""Real data sets, their input space (normalisation / ZCA), DSA and synthetic sets."""

from .augment import DSA, DSAParams
from .datamodule import RealDataModule
from .datasets import RealDataset, get_dataset, list_datasets, register_dataset
from .synthetic import SyntheticSet
from .zca import ZCA

__all__ = [
    "DSA",
    "DSAParams",
    "RealDataModule",
    "RealDataset",
    "SyntheticSet",
    "ZCA",
    "get_dataset",
    "list_datasets",
    "register_dataset",
]
