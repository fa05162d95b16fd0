"""`lightning-distill import-set`, `export-set` and `prepare`: the commands outside LightningCLI.

    lightning-distill import-set logged_files/CIFAR10/10/ConvNet/run --data.name cifar10 \\
        --data.zca true --output outputs/cifar10/datm_ipc10.pt
    lightning-distill export-set outputs/cifar10/ipc10/best.pt --output exported/ipc10
    lightning-distill export-set outputs/digits/ipc10/best.pt --format imagefolder \\
        --output exported/digits_png --data.name digits

``import-set`` reads a directory written by the distill script of MTT, DATM or PAD
(:meth:`~lightning_distill.data.SyntheticSet.from_reference`) for the data named by
``--data.*`` (a RealDataModule's arguments) or the ``data:`` section of ``--config``, and
writes a synthetic set file (``--output``, with its PNG grid). ``export-set`` writes a set
in DATM's layout (``--format datm``, :meth:`~lightning_distill.data.SyntheticSet.to_reference`)
or as a torchvision ImageFolder of PNGs in pixel space (``--format imagefolder``: one
folder per class, ``000``, ``001``, ...; normalisation or ZCA undone). Errors are the
library's (one line from the command line, exit status 2); nothing is written on error.

``prepare`` writes the data set named by ``--data.*`` / ``--config`` in its prepared form
(docs/formats.md, 'Prepared data'), with a progress bar, ahead of a run that reads it
with ``data.prepared: true`` (on many nodes: once per shared file system)::

    lightning-distill prepare --config imagenet64/experts --data.root /data/imagenet64
"""

from __future__ import annotations

import argparse
import difflib
import inspect
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from ..data.datamodule import RealDataModule
from ..data.input_space import InputSpace
from ..data.synthetic import SyntheticSet
from ..errors import ConfigError, InputError
from ..io import atomic_open
from ._common import console

__all__ = ["SET_COMMANDS", "export_imagefolder", "export_set", "import_set", "run_set_command"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        raise ConfigError(f"the command line: {message} (see --help)")


def _bool(text: str) -> bool:
    value = yaml.safe_load(text)
    if not isinstance(value, bool):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value


def _split_data(argv: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
    """``argv`` without its ``--data.KEY VALUE`` / ``--data.KEY=VALUE`` pairs, and those
    pairs (values read as YAML)."""
    rest, data = [], {}
    args = list(argv)
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("--data."):
            key, eq, value = a[len("--data."):].partition("=")
            if not eq:
                if i + 1 >= len(args):
                    raise ConfigError(f"the command line: {a} needs a value")
                value, i = args[i + 1], i + 1
            data[key] = yaml.safe_load(value)
        else:
            rest.append(a)
        i += 1
    return rest, data


def _datamodule(config: str | None, overrides: dict[str, Any], *, required: bool,
                setup: bool = True) -> RealDataModule | None:
    """The RealDataModule of ``--config``'s ``data:`` section with the ``--data.*``
    overrides, prepared and set up (``setup=False``: built only); None when neither
    names data and ``required`` is False."""
    from .recipes import resolve_config

    kwargs: dict[str, Any] = {}
    if config is not None:
        path = resolve_config(config)
        section = (yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}).get("data")
        if not isinstance(section, dict):
            raise ConfigError(f"{path}: no data: section to take the data set from; add "
                              "one or give --data.name")
        kwargs.update(section.get("init_args", section))
        kwargs.pop("class_path", None)
    kwargs.update(overrides)
    if not kwargs:
        if required:
            raise ConfigError("the command line: name the data set the set belongs to: "
                              "--data.name NAME (and --data.zca true for ZCA) or --config FILE")
        return None
    names = [n for n in inspect.signature(RealDataModule).parameters]
    for key in kwargs:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean 'data.{close[0]}'?)" if close else ""
            raise ConfigError(f"the command line: key 'data.{key}': not an argument of "
                              f"RealDataModule{hint}; its keys: {', '.join(names)}")
    if "name" not in kwargs:
        raise ConfigError("the command line: key 'data.name' is missing: name the data set")
    dm = RealDataModule(**kwargs)
    if setup:
        dm.prepare_data()
        dm.setup("fit")
    return dm


def prepare_data_set(datamodule: RealDataModule, *, verify: bool = False) -> Path:
    """Write ``datamodule``'s data set in its prepared form under its ``prepared_root``
    (nothing if it is there; ``verify``: re-hash what is there); returns the directory."""
    from ..data.prepared import open_prepared, prepare

    directory = prepare(datamodule._source(), datamodule._prepared_root(), progress=True,
                        log=console.print)
    real = open_prepared(directory, verify=verify)
    console.print(f"prepared {real.name}: {len(real)} train / {real.test_data.shape[0]} "
                  f"test images, {real.channels}x{real.image_size[0]}x{real.image_size[1]}, "
                  f"{real.num_classes} classes -> {directory}"
                  + (" (every file's SHA-256 checked)" if verify else ""))
    return directory


def import_set(directory: str, datamodule: RealDataModule, output: str, *,
               iteration: str = "best", lr: float | None = None, check_space: bool = True,
               store: str | None = None) -> SyntheticSet:
    """Import a reference script's set and save it at ``output`` (its PNG grid beside it).

    ``store``: the trajectory store of the experts the set was distilled from (its input
    space must be the data's); recorded as ``meta["source_store"]``, where evaluation
    finds the experts that give a random subset the same kind of soft labels
    (docs/method.md, 'DD-Ranking's scores')."""
    syn = SyntheticSet.from_reference(directory, datamodule, iteration=iteration, lr=lr,
                                      check_space=check_space)
    if store is not None:
        from ..trajectories import TrajectoryStore

        st = TrajectoryStore.open(store)
        diff = InputSpace.coerce(st.input_space).mismatch(datamodule.input_space)
        if diff is not None:
            raise InputError(f"{store}: the experts' input space differs from the data's "
                             f"({diff}); name the store the set was distilled from")
        syn.meta["source_store"] = str(store)
        syn.meta.setdefault("model", dict(st.model))
    target = Path(output)
    if target.suffix != ".pt":
        raise InputError(f"--output {output}: name a .pt file for the synthetic set")
    syn.save(target, to_pixels=datamodule.from_input_space)
    console.print(f"imported {syn} from {syn.meta['imported_from']['directory']} "
                  f"({', '.join(syn.meta['imported_from']['files'])}) -> {target}")
    return syn


def _to_pixels(syn: SyntheticSet, datamodule: RealDataModule | None, where: str
               ) -> Callable[[Tensor], Tensor]:
    """The map from the set's input space back to [0, 1] pixels."""
    if datamodule is not None:
        syn.check_compatible(channels=datamodule.channels, image_size=datamodule.image_size,
                             num_classes=datamodule.num_classes,
                             input_space=datamodule.input_space)
        return datamodule.from_input_space
    space = syn.input_space or InputSpace()
    if space.normalization == "meanstd" and space.mean and space.std:
        mean = torch.tensor(space.mean).view(1, -1, 1, 1)
        std = torch.tensor(space.std).view(1, -1, 1, 1)
        return lambda x: x * std + mean
    raise InputError(f"{where}: its input space ({space}) cannot be undone without the data "
                     "(a fitted ZCA): pass the data settings it was distilled with "
                     "(--data.name NAME --data.zca true, or --config FILE)")


def export_imagefolder(syn: SyntheticSet, directory: str | Path,
                       to_pixels: Callable[[Tensor], Tensor], *, overwrite: bool = False
                       ) -> list[Path]:
    """Write the set as PNGs in pixel space, ``<directory>/<class:03d>/<index:05d>.png``
    (torchvision's ImageFolder reads the classes in this order): images mapped by
    ``to_pixels``, clamped to [0, 1] and rounded to 8 bits; the class of an image is its
    hard label (:attr:`SyntheticSet.hard_labels`). Returns the files written."""
    from torchvision.utils import save_image

    d = Path(directory)
    if d.exists() and any(d.iterdir()) and not overwrite:
        raise InputError(f"{d} is not empty; choose another directory or pass "
                         "--overwrite true")
    syn.check_finite()
    with torch.no_grad():
        pixels = to_pixels(syn.images.detach().float().cpu()).clamp(0, 1)
    labels = syn.hard_labels
    paths = []
    for i, (img, c) in enumerate(zip(pixels, labels.tolist(), strict=True)):
        folder = d / f"{c:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:05d}.png"
        with atomic_open(path, "wb") as f:
            save_image(img, f, format="png")
        paths.append(path)
    return paths


def export_set(path: str, output: str, *, fmt: str = "datm", tag: str = "best",
               overwrite: bool = False, datamodule: RealDataModule | None = None
               ) -> list[Path]:
    """Export the set file ``path`` to ``output`` in DATM's layout or as an ImageFolder."""
    syn = SyntheticSet.load(path)
    if fmt == "datm":
        if datamodule is not None:
            syn.check_compatible(channels=datamodule.channels,
                                 image_size=datamodule.image_size,
                                 num_classes=datamodule.num_classes,
                                 input_space=datamodule.input_space)
        paths = syn.to_reference(output, tag=tag, overwrite=overwrite)
    elif fmt == "imagefolder":
        paths = export_imagefolder(syn, output, _to_pixels(syn, datamodule, path),
                                   overwrite=overwrite)
    else:
        raise ConfigError(f"--format {fmt}: use datm or imagefolder")
    console.print(f"exported {syn} -> {output} ({len(paths)} files, {fmt})")
    return paths


def _parser(name: str) -> _Parser:
    p = _Parser(prog=f"lightning-distill {name}", allow_abbrev=False,
                description=SET_COMMANDS[name],
                epilog="The data: --data.KEY VALUE (RealDataModule's arguments: name, root, "
                       "zca, val_fraction, ...) or the data: section of --config FILE|RECIPE.")
    p.add_argument("--config", help="a recipe (file or packaged name) whose data: section "
                   "names the data set")
    if name != "prepare":
        p.add_argument("--output", required=True, help="the synthetic set file (import-set) "
                       "or the directory (export-set) to write")
    if name == "prepare":
        p.add_argument("--verify", type=_bool, default=False, help="re-hash a prepared "
                       "directory that exists against its header (default false)")
        return p
    if name == "import-set":
        p.add_argument("directory", help="the directory holding images_<tag>.pt, "
                       "labels_<tag>.pt (and lr_<tag>.pt), or the run's directory above "
                       "DATM's Normal/")
        p.add_argument("--iteration", default="best", help="'best' or an iteration number")
        p.add_argument("--lr", type=float, default=None, help="the step size (syn_lr) when "
                       "the directory holds no lr_<tag>.pt (MTT)")
        p.add_argument("--check_space", type=_bool, default=True, help="refuse images whose "
                       "statistics are clearly another input space's (default true)")
        p.add_argument("--store", default=None, help="the experts' trajectory store the set "
                       "was distilled from (for the scores of soft-label sets)")
    else:
        p.add_argument("synthetic", help="the synthetic set file (.pt)")
        p.add_argument("--format", dest="fmt", choices=("datm", "imagefolder"),
                       default="datm")
        p.add_argument("--tag", default="best", help="datm: the files' tag (best or an "
                       "iteration number)")
        p.add_argument("--overwrite", type=_bool, default=False)
    return p


#: the subcommands of this module, with their one-line help
SET_COMMANDS = {
    "import-set": "import a synthetic set saved by the MTT / DATM / PAD distill scripts",
    "export-set": "write a synthetic set in DATM's layout or as an ImageFolder of PNGs",
    "prepare": "write a data set once as uint8 files that stages stream rows from",
}


def run_set_command(name: str, argv: Sequence[str]) -> int:
    """``lightning-distill import-set|export-set ...`` (``argv`` without the name)."""
    rest, data = _split_data(argv)
    args = _parser(name).parse_args(rest)
    if name == "prepare":
        dm = _datamodule(args.config, data, required=True, setup=False)
        assert dm is not None
        prepare_data_set(dm, verify=args.verify)
    elif name == "import-set":
        dm = _datamodule(args.config, data, required=True)
        assert dm is not None
        import_set(args.directory, dm, args.output, iteration=args.iteration, lr=args.lr,
                   check_space=args.check_space, store=args.store)
    else:
        dm = _datamodule(args.config, data, required=False)
        export_set(args.synthetic, args.output, fmt=args.fmt, tag=args.tag,
                   overwrite=args.overwrite, datamodule=dm)
    return 0
