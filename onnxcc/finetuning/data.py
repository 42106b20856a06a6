"""Training data for fine-tuning, read one sample at a time so memory does not grow with the set.

A :class:`Samples` is a sized, indexable source of ``(inputs by graph-input name, label)`` pairs
(label -1 when unlabeled). Sources:

* an ``.npy`` of inputs, or an ``.npz`` with ``x`` or one array per input name and optional
  integer labels ``y``: memory-mapped where the file allows it (``.npy``, ``np.savez``'s stored
  members), so only the samples in use are read;
* an image folder: class sub-folders give labels (sorted names → 0, 1, …), images directly in the
  folder are unlabeled; a model with several inputs takes a sub-folder per input name holding
  files of the same relative names. Images are decoded as they are used, with ``--calib``'s
  preprocessing;
* from Python, a torch ``Dataset`` whose items are ``{input: array}`` (optionally ``"y"``),
  ``(x, y)`` or ``x``; or :class:`Batches` the caller makes (a torch ``DataLoader``, any
  re-iterable, not indexable, of batches with a length), used as they come.

:class:`TrainSet` turns a source into what a torch ``DataLoader`` reads: samples keyed by
``(index, epoch)`` so that augmentation (random resized crop and flip of image inputs) is drawn
from the sample and the epoch alone — the same in any worker process, on any rank, after a resume.
"""
from __future__ import annotations

import hashlib
import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Protocol, Sequence

import numpy as np
import onnx
from onnx import helper

from ..analysis.view import graph_inputs
from ..calib import IMAGE_SUFFIXES, ImagePreprocess, image_files, load_image
from ..errors import CalibrationError

__all__ = ["Samples", "ArraySamples", "ImageFolder", "DatasetSamples", "TrainSet", "load_npz", "open_samples",
           "as_samples", "fixed_batch", "Batches", "is_batches"]

UNLABELED = -1
# crops keep 75-100% of the image: on Animal-MNIST's 4-epoch distillation recovery's wider range
# (35-100%) cost accuracy against no augmentation at all, this one did not
CROP_SCALE = (0.75, 1.0)
SCAN_BYTES = 1 << 30   # arrays up to this size are checked for NaN/Inf when opened; all samples as they are read


class Samples(Protocol):
    """A sized, indexable training source."""

    names: tuple[str, ...]
    labeled: bool

    def __len__(self) -> int: ...

    def sample(self, i: int) -> tuple[dict[str, np.ndarray], int]: ...


# ================================================================================== arrays
def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Read training arrays: an ``.npz`` with ``x`` (one input) or one array per input name, and
    optional ``y`` (N,) integer labels; or an ``.npy`` of inputs. Memory-mapped where the file
    stores an array uncompressed."""
    p = Path(path)
    if not p.is_file():
        raise CalibrationError(f"data file not found: {p}")
    return _validated(_read_npy(p) if p.suffix == ".npy" else _read_npz(p), str(p))


def _validated(arrays: Mapping[str, Any], p: str) -> dict[str, np.ndarray]:
    """Input arrays of one length N (checked for NaN/Inf up to SCAN_BYTES) and optional labels ``y``."""
    arrays = {k: v if isinstance(v, np.ndarray) else np.asarray(_numpy(v)) for k, v in arrays.items()}
    feeds = {k: v for k, v in arrays.items() if k != "y"}
    if not feeds:
        raise CalibrationError(f"{p} has no input arrays (found: {', '.join(sorted(arrays)) or 'none'})")
    n = max(len(x) if x.ndim else 0 for x in feeds.values())
    for k, x in feeds.items():
        if x.dtype.kind not in "fiub" or x.ndim < 2 or len(x) == 0 or len(x) != n:
            raise CalibrationError(f"{p}: {k!r} must be a numeric (N, ...) array with N >= 1 like the others, "
                                   f"got {x.dtype} {x.shape}")
        if x.dtype.kind == "f" and x.nbytes <= SCAN_BYTES and not _finite(x):
            raise CalibrationError(f"{p}: {k!r} holds NaN or Inf values")
    data = dict(feeds)
    if "y" in arrays:
        y = np.asarray(arrays["y"])
        if y.shape != (n,):
            raise CalibrationError(f"{p}: 'y' must have shape ({n},) to match the inputs, got {y.shape}")
        if y.dtype.kind not in "iu" or (y < 0).any():
            raise CalibrationError(f"{p}: 'y' must hold non-negative integer class indices, got {y.dtype}")
        data["y"] = y.astype(np.int64)
    return data


def _finite(x: np.ndarray, rows: int = 1024) -> bool:
    return all(np.isfinite(x[i:i + rows]).all() for i in range(0, len(x), rows))


def _read_npy(p: Path) -> dict[str, np.ndarray]:
    try:
        return {"x": np.load(p, mmap_mode="r", allow_pickle=False)}
    except (OSError, ValueError) as e:
        raise CalibrationError(f"not a readable .npy file: {p} ({str(e).strip().splitlines()[0][:120]})") from None


def _read_npz(p: Path) -> dict[str, np.ndarray]:
    try:
        with zipfile.ZipFile(p) as z:
            members = [m for m in z.infolist() if m.filename.endswith(".npy")]
            if not members:
                raise CalibrationError(f"expected an .npz archive with arrays 'x' (and 'y'): {p}")
            return {m.filename[:-4]: _npz_member(p, z, m) for m in members}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        with open(p, "rb") as f:
            plain = f.read(6) == b"\x93NUMPY"
        if zipfile.is_zipfile(p) or not plain:
            reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
            raise CalibrationError(f"not a readable .npz file: {p} ({reason})") from None
        raise CalibrationError(f"expected an .npz archive with arrays 'x' (and 'y'), got a plain array: {p}") from None


def _npz_member(p: Path, z: zipfile.ZipFile, m: zipfile.ZipInfo) -> np.ndarray:
    """One array of an .npz: memory-mapped when stored uncompressed (``np.savez``), else read."""
    if m.compress_type != zipfile.ZIP_STORED:
        with z.open(m) as f:
            return np.lib.format.read_array(f, allow_pickle=False)
    with open(p, "rb") as f:
        f.seek(m.header_offset)
        local = f.read(30)
        # the local header's own name and extra lengths (they may differ from the central directory's)
        start = m.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
        f.seek(start)
        version = np.lib.format.read_magic(f)
        shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                 else np.lib.format.read_array_header_2_0(f))
        offset = f.tell()
    if dtype.hasobject:
        raise ValueError(f"array {m.filename!r} holds Python objects")
    if not shape or 0 in shape:
        return np.zeros(shape, dtype)
    return np.memmap(p, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


@dataclass
class ArraySamples:
    """Samples from arrays with a leading sample axis (in memory or memory-mapped)."""

    x: dict[str, np.ndarray]
    y: np.ndarray | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.x)

    @property
    def labeled(self) -> bool:
        return self.y is not None

    def __len__(self) -> int:
        return len(next(iter(self.x.values())))

    def sample(self, i: int) -> tuple[dict[str, np.ndarray], int]:
        return {k: _row(v, i) for k, v in self.x.items()}, int(self.y[i]) if self.y is not None else UNLABELED

    def __getstate__(self) -> dict[str, Any]:
        """Memory maps travel to worker processes as their file and place, not as copies of the data."""
        maps = {k: (v.filename, v.offset, v.shape, v.dtype, v.flags.f_contiguous)
                for k, v in self.x.items() if isinstance(v, np.memmap)}
        return {"x": {k: v for k, v in self.x.items() if k not in maps}, "maps": maps, "y": self.y}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.x = dict(state["x"])
        for k, (path, offset, shape, dtype, fortran) in state["maps"].items():
            self.x[k] = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")
        self.y = state["y"]


def _row(a: np.ndarray, i: int) -> np.ndarray:
    """Row ``i`` of ``a``. A C-ordered memory map's row is read from its file instead: pages read
    through the map count in the process's memory until the kernel wants them back, so one epoch
    over a large file would look like memory growing with the data set."""
    if isinstance(a, np.memmap) and a.flags.c_contiguous and a.filename and a.ndim > 1:
        size = a.dtype.itemsize * math.prod(a.shape[1:])
        with open(a.filename, "rb") as f:
            data = os.pread(f.fileno(), size, a.offset + i * size)
        return np.frombuffer(data, a.dtype).reshape(a.shape[1:])
    return np.asarray(a[i])


def _arrays_for(data: Mapping[str, np.ndarray], names: Sequence[str], what: str) -> ArraySamples:
    """``data``'s arrays keyed by the model's input names (``x`` names a single input)."""
    data = _validated(data, f"{what} data")
    if "x" in data and len(names) == 1 and names[0] not in data:
        return ArraySamples({names[0]: data["x"]}, data.get("y"))
    missing = [n for n in names if n not in data]
    if missing:
        raise CalibrationError(f"{what} data has no array for input(s) {missing} (it has "
                               f"{sorted(k for k in data if k != 'y')}); name arrays after the inputs")
    return ArraySamples({n: data[n] for n in names}, data.get("y"))


# ============================================================================ image folders
@dataclass
class ImageFolder:
    """Images decoded on use. ``files[k]`` holds sample k's file per input name."""

    files: list[dict[str, Path]]
    labels: list[int] | None
    classes: list[str]
    preprocess: ImagePreprocess
    grey: frozenset[str] = frozenset()   # inputs with one channel: images read as luminance

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.files[0])

    @property
    def labeled(self) -> bool:
        return self.labels is not None

    def __len__(self) -> int:
        return len(self.files)

    def sample(self, i: int) -> tuple[dict[str, np.ndarray], int]:
        x = {k: load_image(f, self.preprocess, grey=k in self.grey) for k, f in self.files[i].items()}
        return x, self.labels[i] if self.labels is not None else UNLABELED

    @classmethod
    def open(cls, root: Path, names: Sequence[str], preprocess: ImagePreprocess, grey: frozenset[str] = frozenset(),
             classes: Sequence[str] | None = None) -> "ImageFolder":
        """Class sub-folders (labeled; sorted names → 0, 1, … as torchvision numbers them, or
        the training set's ``classes``) or images directly in ``root`` (unlabeled); with several
        inputs, ``root/<input name>/`` each, paired by relative path."""
        if len(names) == 1:
            per_input = {names[0]: _listing(root)}
        else:
            absent = [n for n in names if not (root / n).is_dir()]
            if absent:
                raise CalibrationError(f"{root}: a model with inputs {list(names)} reads a sub-folder per input; "
                                       f"missing {absent}")
            per_input = {n: _listing(root / n) for n in names}
        keys = sorted(per_input[names[0]])
        for n in names[1:]:
            if set(per_input[n]) != set(keys):
                odd = sorted(set(per_input[n]) ^ set(keys))
                raise CalibrationError(f"{root}: input folders {names[0]!r} and {n!r} hold different files "
                                       f"({len(odd)} unpaired, e.g. {odd[0]})")
        found = sorted({k.parent.as_posix() for k in keys} - {"."})
        if found and len(found) != len({k.parent.as_posix() for k in keys}):
            raise CalibrationError(f"{root}: images both directly in the folder and in class sub-folders; "
                                   "use one or the other")
        classes = list(classes) if classes else found
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise CalibrationError(f"{root}: class folder(s) {unknown[:3]} are not classes of the training data")
        index = {c: k for k, c in enumerate(classes)}
        labels = [index[k.parent.as_posix()] for k in keys] if found else None
        files = [{n: per_input[n][k] for n in names} for k in keys]
        return cls(files, labels, classes if found else [], preprocess, grey)


def _listing(folder: Path) -> dict[Path, Path]:
    """Images in ``folder`` and its class sub-folders (one level), by path relative to it."""
    if not folder.is_dir():
        raise CalibrationError(f"not a folder: {folder}")
    found = {f.relative_to(folder): f for f in image_files(folder)}
    for sub in (d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")):
        found.update({f.relative_to(folder): f for f in image_files(sub)})
    if not found:
        raise CalibrationError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder} or its sub-folders")
    return found


# ========================================================================== torch datasets
@dataclass
class DatasetSamples:
    """A torch ``Dataset`` (anything sized and indexable) whose items are ``{input: x}`` (with an
    optional ``"y"``), ``(x, y)`` or ``x``."""

    dataset: Any
    names: tuple[str, ...]
    labeled: bool = False

    def __post_init__(self) -> None:
        self.labeled = self.sample(0)[1] != UNLABELED

    def __len__(self) -> int:
        return len(self.dataset)

    def sample(self, i: int) -> tuple[dict[str, np.ndarray], int]:
        x, y = _item(self.dataset[i], self.names, f"dataset item {i}")
        label = np.asarray(_numpy(y)) if y is not None else np.asarray(UNLABELED)
        if label.size != 1 or label.dtype.kind not in "iu":
            raise CalibrationError(f"dataset item {i}: the label must be one integer class index, got {label!r}")
        return {n: _numpy(v) for n, v in x.items()}, int(label)


def _item(item: Any, names: Sequence[str], what: str) -> tuple[dict[str, Any], Any]:
    """An item or batch as ``({input name: value}, label or None)``: from ``{input: x, "y": y}``
    (``x`` naming a single input), ``(x, y)`` or ``x``."""
    y: Any = None
    if isinstance(item, Mapping):
        x, y = {k: v for k, v in item.items() if k != "y"}, item.get("y")
    elif isinstance(item, (tuple, list)) and len(item) == 2:
        x, y = item
    else:
        x = item
    if not isinstance(x, Mapping):
        if len(names) != 1:
            raise CalibrationError(f"{what}: a model with inputs {list(names)} needs dicts keyed by input name")
        x = {names[0]: x}
    if len(names) == 1 and set(x) == {"x"}:
        x = {names[0]: x["x"]}
    missing = [n for n in names if n not in x]
    if missing:
        raise CalibrationError(f"{what} has no value for input(s) {missing}")
    return {n: x[n] for n in names}, y


def _numpy(v: Any) -> np.ndarray:
    return v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)


# ================================================================================ dispatch
def open_samples(path: str | Path, model: onnx.ModelProto, preprocess: ImagePreprocess | None = None,
                 what: str = "train", classes: Sequence[str] | None = None) -> Samples:
    """The training source at ``path``: an image folder (its class folders numbered as
    ``classes`` where given: a validation set follows its training set), an ``.npy`` or an ``.npz``."""
    p = Path(path)
    names = [i.name for i in graph_inputs(model)]
    if p.is_dir():
        pp = preprocess or ImagePreprocess()
        return ImageFolder.open(p, names, pp, _grey_inputs(model, pp), classes)
    if not p.exists():
        raise CalibrationError(f"{what} data not found: {p}")
    if p.suffix not in (".npy", ".npz"):
        raise CalibrationError(f"unsupported {what} data {p.name}: use an image folder, .npy or .npz")
    return _arrays_for(load_npz(p), names, what)


def _grey_inputs(model: onnx.ModelProto, pp: ImagePreprocess) -> frozenset[str]:
    """Image inputs with one channel (on the layout's channel axis)."""
    axis = 3 if pp.layout == "NHWC" else 1
    return frozenset(vi.name for vi in graph_inputs(model)
                     if len(dims := vi.type.tensor_type.shape.dim) == 4 and dims[axis].dim_value == 1)


def as_samples(data: Any, model: onnx.ModelProto, what: str, preprocess: ImagePreprocess | None = None,
               classes: Sequence[str] | None = None) -> Samples:
    """Any supported training source as :class:`Samples`."""
    names = [i.name for i in graph_inputs(model)]
    if isinstance(data, (str, Path)):
        return open_samples(data, model, preprocess, what, classes)
    if isinstance(data, Mapping):
        return _arrays_for(data, names, what)
    if hasattr(data, "sample") and hasattr(data, "labeled"):
        return data
    if hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        if len(data) == 0:
            raise CalibrationError(f"{what} dataset is empty")
        return DatasetSamples(data, tuple(names))
    raise CalibrationError(f"{what} data must be a path, a dict of arrays or a sized, indexable dataset; "
                           f"got {type(data).__name__}")


# ============================================================================ what torch reads
def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The batch size the model's inputs are declared with, if any (graphs may bake it into Reshapes)."""
    for vi in graph_inputs(model):
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[0].dim_value > 0:
            return dims[0].dim_value
    return None


def _input_checks(model: onnx.ModelProto) -> dict[str, tuple[np.dtype, list[int]]]:
    return {vi.name: (helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type),
                      [d.dim_value for d in vi.type.tensor_type.shape.dim]) for vi in graph_inputs(model)}


def _check_dims(shapes: Mapping[str, tuple[int, ...]], inputs: Mapping[str, tuple[np.dtype, list[int]]],
                what: str) -> None:
    """Each input's (batch, ...) shape against the model's declared dims, the batch excepted."""
    for name, (_, dims) in inputs.items():
        shape = shapes[name]
        if len(dims) != len(shape) or any(d > 0 and d != s for d, s in zip(dims[1:], shape[1:])):
            want = ", ".join(["N"] + [str(d) if d > 0 else "?" for d in dims[1:]])
            raise CalibrationError(f"{what} for input {name!r} has shape (N, {', '.join(map(str, shape[1:]))}); "
                                   f"the model expects ({want})")


class TrainSet:
    """A map-style dataset for ``torch.utils.data.DataLoader``, keyed by ``(index, epoch)``.

    Each sample is cast to its input's type; image inputs are augmented (when ``augment``) by a
    generator seeded from ``(seed, epoch, index)``, so the result does not depend on which worker
    or rank reads it.
    """

    def __init__(self, samples: Samples, model: onnx.ModelProto, what: str, augment: bool = False, seed: int = 0):
        self.samples, self.what, self.seed = samples, what, seed
        self.inputs = _input_checks(model)
        first, _ = samples.sample(0)
        self.shapes = {k: (1, *np.shape(v)) for k, v in first.items()}
        self.expect(model)
        self.images = _image_inputs(first) if augment else frozenset()

    def __len__(self) -> int:
        return len(self.samples)

    def expect(self, model: onnx.ModelProto) -> None:
        """Fail in one line unless ``model``'s inputs take these samples."""
        _check_dims(self.shapes, _input_checks(model), f"{self.what} data")

    def first(self, batch: int) -> dict[str, np.ndarray]:
        """The first sample, as given, repeated to a batch of ``batch`` (for probes and checks)."""
        x, _ = self.samples.sample(0)
        return {k: np.repeat(np.asarray(x[k], dtype=dtype)[None], batch, axis=0) for k, (dtype, _) in self.inputs.items()}

    def __getitem__(self, key: tuple[int, int]) -> tuple[dict[str, np.ndarray], int]:
        i, epoch = key
        x, y = self.samples.sample(int(i))
        # a copy: memory-mapped samples are read-only, and torch wants tensors it may write
        out = {k: np.array(x[k], dtype=dtype, order="C") for k, (dtype, _) in self.inputs.items()}
        bad = [k for k, v in out.items() if v.dtype.kind == "f" and not np.isfinite(v).all()]
        if bad:
            raise CalibrationError(f"{self.what} sample {i} holds NaN or Inf in input(s) {bad}")
        if self.images:
            out = self._augmented(out, int(i), epoch)
        return out, y

    def _augmented(self, x: dict[str, np.ndarray], i: int, epoch: int) -> dict[str, np.ndarray]:
        import torch

        from ..recover.augment import augment, image_layout

        digest = hashlib.blake2b(f"{self.seed}/{epoch}/{i}".encode(), digest_size=8).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
        for k in self.images:
            t = torch.from_numpy(x[k])[None]
            x[k] = augment(t, image_layout(tuple(t.shape)), gen, CROP_SCALE)[0].numpy()
        return x


def _image_inputs(sample: Mapping[str, np.ndarray]) -> frozenset[str]:
    from ..recover.augment import image_layout

    return frozenset(k for k, v in sample.items() if v.dtype.kind == "f" and image_layout((1, *v.shape)))


def is_batches(data: Any) -> bool:
    """A source of whole batches: a DataLoader, or an iterable that cannot be indexed (a list is
    read as samples, like a Dataset)."""
    if isinstance(data, (str, Path, Mapping)) or hasattr(data, "sample"):
        return False
    return hasattr(data, "batch_sampler") or (hasattr(data, "__iter__") and not hasattr(data, "__getitem__"))


class Batches:
    """Batches the caller makes — a torch ``DataLoader`` or any re-iterable, not indexable, of
    batches with a length — used as they come, one pass per epoch. A batch is ``{input: x}`` (optionally
    ``"y"``), ``(x, y)`` or ``x``. onnxcc neither augments nor shards them: that is the loader's
    job (under torchrun give it a DistributedSampler; its ``set_epoch`` is called each epoch)."""

    images: frozenset[str] = frozenset()

    def __init__(self, source: Any, model: onnx.ModelProto, what: str):
        if not hasattr(source, "__len__"):
            raise CalibrationError(f"{what} batches need a length (len()) to schedule the learning rate")
        if len(source) == 0:
            raise CalibrationError(f"{what} batches are empty")
        self.source, self.what = source, what
        self.inputs = _input_checks(model)
        x, y = self._convert(next(iter(source)))
        self.shapes = {k: tuple(v.shape) for k, v in x.items()}
        self.expect(model)
        self.labeled = bool((y != UNLABELED).any())

    def __len__(self) -> int:
        return len(self.source)

    def expect(self, model: onnx.ModelProto) -> None:
        """Fail in one line unless ``model``'s inputs take these batches."""
        _check_dims(self.shapes, _input_checks(model), f"{self.what} batch")

    def __iter__(self) -> Iterator[tuple[dict[str, Any], Any]]:
        return (self._convert(b) for b in self.source)

    def set_epoch(self, epoch: int) -> None:
        sampler = getattr(self.source, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)

    def first(self, batch: int) -> dict[str, np.ndarray]:
        x, _ = self._convert(next(iter(self.source)))
        return {k: np.repeat(v[:1].numpy(), batch, axis=0) for k, v in x.items()}

    def _convert(self, b: Any) -> tuple[dict[str, Any], Any]:
        import torch

        x, y = _item(b, list(self.inputs), f"a {self.what} batch")
        feeds = {n: torch.as_tensor(np.asarray(_numpy(x[n]), dtype=dtype)) for n, (dtype, _) in self.inputs.items()}
        n = len(next(iter(feeds.values())))
        labels = torch.full((n,), UNLABELED, dtype=torch.int64) if y is None else torch.as_tensor(_numpy(y)).long()
        return feeds, labels
