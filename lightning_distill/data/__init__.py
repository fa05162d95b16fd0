"""Real data sets, their input space (normalisation / ZCA), DSA and synthetic sets."""

from .augment import DSA, DSAParams
from .datamodule import RealDataModule
from .datasets import RealDataset, get_dataset, list_datasets, register_dataset
from .input_space import InputSpace
from .synthetic import SyntheticSet
from .zca import ZCA

__all__ = [
    "DSA",
    "DSAParams",
    "InputSpace",
    "RealDataModule",
    "RealDataset",
    "SyntheticSet",
    "ZCA",
    "get_dataset",
    "list_datasets",
    "register_dataset",
]
