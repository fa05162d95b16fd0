"""Real data sets, read from their original on-disk formats.

``get_dataset(name, root=None, **kw)`` returns a :class:`RealDataset` holding the whole
train and test splits in memory as uint8 ``[N, C, H, W]`` tensors, plus the
normalisation constants (docs/method.md, section 'ZCA whitening and normalisation'), the
class names, and per-class access.

Registered names (``list_datasets()``):

===============  ====================================================================
digits           scikit-learn ``load_digits`` (bundled): 1797 images 1x8x8, 10 classes.
                 No official test split: a fixed stratified split (1/3 test, seed 0).
fashion_mnist    idx files (gzipped or not) in ``root``, ``root/FashionMNIST/raw`` or the
                 Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``).
mnist            idx files in ``root`` or ``root/MNIST/raw`` (torchvision layout).
cifar10          ``root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``.
cifar100         ``root/cifar-100-python/{train, test, meta}`` (fine labels; ``coarse=True``).
svhn             ``root/{train,test}_32x32.mat`` (label 10 means digit 0 and maps to 0).
tiny_imagenet    ``root/tiny-imagenet-200`` exactly as the official zip unpacks; the
                 labelled ``val/`` split is used as the test split.
image_folder     ``root/train/<class>/*`` and ``root/test/<class>/*``, or ``root/<class>/*``
                 with a seeded stratified test split.
imagenet64       the downsampled ImageNet (Chrabaszcz et al. 2017), npz release:
                 ``train_data_batch_1..10.npz`` and ``val_data.npz`` (the test split); 1000
                 classes in the release's label order (map_clsloc ids), named by wnid.
imagenet_subset  an MTT ImageNet subset (``subset=`` imagenette, imagewoof, imagefruit,
                 imageyellow, imagemeow, imagesquawk) at 128x128 from ImageNet's
                 ``train/<wnid>/`` and ``val/<wnid>/`` JPEG folders.
===============  ====================================================================

``root`` defaults to ``$LIGHTNING_DISTILL_DATA`` if set, else
``~/.cache/lightning_distill/data`` (:func:`default_data_root`). A missing data set
raises :class:`FileNotFoundError` listing every path looked at and how to get the data;
a corrupt or truncated file raises :class:`DatasetFormatError` naming the file.

The package holds these parts: :mod:`.container` (:class:`RealDataset`, the stratified
split), :mod:`.registry` (names to loaders), :mod:`.formats` (readers of idx, CIFAR
pickle, SVHN .mat and image files), :mod:`.loaders` (the registered loaders and their
constants), :mod:`.sources` (data sets read by row ranges) and :mod:`.imagenet` (the two
ImageNet sets, each registered as a source and as a loader reading all of it). The names
below are re-exported here, where they have always been importable.
"""

# Besides __all__, the constants and loaders stay importable from here as from the
# former single module (lightning_distill.data.datasets.CIFAR_MEAN, ...).
from .container import DatasetFormatError, RealDataset, mean_std, stratified_split  # noqa: F401
from .formats import IMAGE_EXTENSIONS, load_images, read_idx  # noqa: F401
from .imagenet import (  # noqa: F401  (importing it registers imagenet64, imagenet_subset)
    IMAGENET_SUBSETS,
    imagenet64_source,
    imagenet_subset_source,
    imagenet_wnids,
    load_imagenet64,
    load_imagenet_subset,
)
from .loaders import (  # noqa: F401
    CIFAR10_CLASSES,
    CIFAR10_URL,
    CIFAR100_URL,
    CIFAR_MEAN,
    CIFAR_STD,
    DIGIT_CLASSES,
    DIGITS_SPLIT_SEED,
    DIGITS_TEST_FRACTION,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    FASHION_MNIST_SYSTEM_DIRS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MNIST_MEAN,
    MNIST_STD,
    SVHN_MEAN,
    SVHN_STD,
    SVHN_URL,
    TINY_IMAGENET_URL,
    load_cifar10,
    load_cifar100,
    load_digits,
    load_fashion_mnist,
    load_image_folder,
    load_mnist,
    load_svhn,
    load_tiny_imagenet,
)
from .registry import (  # noqa: F401
    _REGISTRY,
    DATA_ENV_VAR,
    Loader,
    default_data_root,
    get_dataset,
    list_datasets,
    register_dataset,
)

__all__ = [
    "DatasetFormatError",
    "RealDataset",
    "default_data_root",
    "get_dataset",
    "list_datasets",
    "read_idx",
    "register_dataset",
    "stratified_split",
]
