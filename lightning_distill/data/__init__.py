"""Real data sets, their input space (normalisation / ZCA), DSA, synthetic sets and the
datamodule that trains on a synthetic set and tests on the real data."""

from .augment import DSA, DSAParams
from .datamodule import RealDataModule
from .datasets import RealDataset, get_dataset, list_datasets, register_dataset
from .input_space import InputSpace
from .synthetic import SyntheticSet
from .synthetic_datamodule import SyntheticDataModule, synthetic_train_loader
from .zca import ZCA

__all__ = [
    "DSA",
    "DSAParams",
    "InputSpace",
    "RealDataModule",
    "RealDataset",
    "SyntheticDataModule",
    "SyntheticSet",
    "ZCA",
    "get_dataset",
    "list_datasets",
    "register_dataset",
    "synthetic_train_loader",
]
