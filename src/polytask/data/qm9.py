"""QM9: 130,831 small organic molecules and 11 quantum-chemical properties to regress.

The multi-task QM9 benchmark of Nash-MTL (Navon et al., ICML 2022,
https://arxiv.org/abs/2202.01017), FAMO (Liu et al., NeurIPS 2023,
https://arxiv.org/abs/2306.03792) and LibMTL: one graph per molecule and one regression task
per property (Ramakrishnan et al., 2014, https://doi.org/10.1038/sdata.2014.22).

Source: the QM9 tables that the ``qm9pack`` package ships (``pip install 'polytask[data]'``),
``data/qm9_part{1,2,3}.csv`` inside the package, read without importing it. They are parsed
once (about a minute) and cached as a compressed ``.npz`` keyed by the files' sizes and
modification times; the parsed arrays are verified against a pinned SHA-256 both after
parsing and whenever a cache is loaded (a cache that fails is rebuilt, never trusted).

Tasks and units (those of the papers' tables):

========  =========================================================  ==============
task      property (CSV column)                                      unit
========  =========================================================  ==============
mu        dipole moment (``Dipole_debye``)                           D
alpha     isotropic polarizability (``Polarizability_bohr3``)        bohr^3
homo      HOMO energy (``HOMO_au``)                                  meV
lumo      LUMO energy (``LUMO_au``)                                  meV
r2        electronic spatial extent (``R2_bohr2``)                   bohr^2
zpve      zero-point vibrational energy (``ZPVE_au``)                meV
U0        atomization energy at 0 K (``InternalEnergy_0K_au``)       meV
U         atomization energy at 298.15 K (``InternalEnergy_298K_au``)  meV
H         atomization enthalpy at 298.15 K (``Enthalphy_298K_au``)   meV
G         atomization free energy at 298.15 K                        meV
Cv        heat capacity at 298.15 K (``Heatcapacity_Cv_cal_mol_K``)  cal/(mol K)
========  =========================================================  ==============

As in the papers' code (torch_geometric's QM9 targets 0, 1, 2, 3, 5, 6, 12, 13, 14, 15, 11),
U0, U, H and G are *atomization* energies: the molecule's energy minus the sum of its free
atoms' energies (:data:`ATOM_REFERENCE`, the QM9 reference table), and the HOMO-LUMO gap is
left out. The CSV gives energies in Hartree; Nash-MTL's code converts them to eV and reports
the MAE of the seven energies in meV, so polytask stores and reports them in meV
(1 Hartree = 27.211386246 eV, torch_geometric's constant).

Normalisation: every target is standardised with the mean and standard deviation (ddof 1) of
the *training* split, as in Nash-MTL's code. The data set keeps targets in their original
units; each task's loss standardises the target and reads the network's output as a
standardised value, and each task's ``postprocess`` maps the output back
(``pred * std + mean``, in float64), so the reported ``mae`` is in the units above. The means
and deviations are in ``bundle.info["target_mean"]`` / ``["target_std"]``.

Graphs: every atom is a node with 6 features: a one-hot of its element (H, C, N, O, F) and its
atomic number. Every ordered pair of distinct atoms is an edge (a complete graph, no self
loops: ``n (n - 1)`` edges for ``n`` atoms) whose one feature is the interatomic distance in
Angstrom. How this differs from the papers (torch_geometric's QM9, which needs RDKit-derived
data): their nodes have 11 features (the same 6, plus aromaticity, sp / sp2 / sp3
hybridisation and the number of bonded hydrogens) and their edges 5 (a one-hot of the bond
type single / double / triple / aromatic, zero for non-bonded pairs, plus the distance). The
CSV has no bonds, so the network must infer them from distances.

Splits: a seeded permutation of the molecules (of a seeded ``subset`` of them, if asked) gives
``n_test`` test, ``n_val`` validation and the rest training molecules (Nash-MTL: 10,000 /
10,000 / 110,831 after a random shuffle).
"""

from __future__ import annotations

import ast
import csv
import hashlib
import importlib.util
import logging
import math
import numbers
import os
import sys
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import ConfigError, DataError, did_you_mean
from ..metrics.regression import RegressionMetric
from ..tasks import Task
from ._options import check_int
from .base import DATASETS, DataBundle
from .graphs import collate_graphs

__all__ = [
    "ATOM_REFERENCE",
    "TARGETS",
    "QM9Dataset",
    "QM9Source",
    "load_source",
    "qm9",
]

log = logging.getLogger(__name__)

PACKAGE = "qm9pack"
INSTALL = "pip install 'polytask[data]'  (or: pip install qm9pack)"
CSV_FILES = ("qm9_part1.csv", "qm9_part2.csv", "qm9_part3.csv")
NUM_MOLECULES = 130_831
NUM_ATOMS = 2_359_210
"""Atoms over all molecules (counted in qm9pack 1.0.3)."""
SOURCE_SHA256 = "e9a533fac72015755d445f52fab8e2db9573ca2ba496dc5ab30290d14a6a777b"
"""SHA-256 of the parsed arrays (see :func:`_digest`), computed from qm9pack 1.0.3."""
CACHE_VERSION = 1

HARTREE_TO_MEV = 27.211386246 * 1000.0
ELEMENTS = ("H", "C", "N", "O", "F")
ATOMIC_NUMBERS = (1, 6, 7, 8, 9)

TARGETS: Mapping[str, tuple[str, str]] = {
    "mu": ("Dipole_debye", "D"),
    "alpha": ("Polarizability_bohr3", "bohr^3"),
    "homo": ("HOMO_au", "meV"),
    "lumo": ("LUMO_au", "meV"),
    "r2": ("R2_bohr2", "bohr^2"),
    "zpve": ("ZPVE_au", "meV"),
    "U0": ("InternalEnergy_0K_au", "meV"),
    "U": ("InternalEnergy_298K_au", "meV"),
    "H": ("Enthalphy_298K_au", "meV"),
    "G": ("GibbsFreeEnergy_298K_au", "meV"),
    "Cv": ("Heatcapacity_Cv_cal_mol_K", "cal/(mol K)"),
}
"""Task name -> (CSV column, reported unit), in the papers' order."""

ATOM_REFERENCE: Mapping[str, tuple[float, ...]] = {
    "U0": (-0.500273, -37.846772, -54.583861, -75.064579, -99.718730),
    "U": (-0.498857, -37.845355, -54.582445, -75.063162, -99.717314),
    "H": (-0.497912, -37.844411, -54.581501, -75.062219, -99.716370),
    "G": (-0.510927, -37.861317, -54.598897, -75.079532, -99.733544),
}
"""Energies of the free atoms H, C, N, O, F in Hartree (QM9's ``atomref`` table)."""

COLUMNS = ("Index", "N_atoms", "Elements", "XYZ_Ang", *(c for c, _ in TARGETS.values()))
NODE_FEATURES = len(ELEMENTS) + 1
EDGE_FEATURES = 1

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class QM9Source:
    """Every molecule of QM9 as flat arrays.

    Attributes:
        index: QM9's molecule number (1-based, ``dsgdb9nsd_000001`` is 1), shape ``(M,)``.
        offsets: atoms of molecule ``m`` are rows ``offsets[m]:offsets[m + 1]``, ``(M + 1,)``.
        z: atomic number of every atom, ``(A,)``.
        pos: coordinates in Angstrom, ``(A, 3)``.
        raw: the target columns of :data:`TARGETS` as in the CSV (Hartree for energies,
            total energies for U0, U, H, G), ``(M, 11)``.
    """

    index: IntArray
    offsets: IntArray
    z: IntArray
    pos: FloatArray
    raw: FloatArray

    def targets(self) -> FloatArray:
        """The 11 targets in the reported units (see the module docstring), ``(M, 11)``."""
        out = self.raw.copy()
        names = list(TARGETS)
        counts = np.zeros((len(self.index), len(ELEMENTS)))
        molecule = np.repeat(np.arange(len(self.index)), np.diff(self.offsets))
        for e, number in enumerate(ATOMIC_NUMBERS):
            counts[:, e] = np.bincount(molecule[self.z == number], minlength=len(self.index))
        for name in ("homo", "lumo", "zpve"):
            out[:, names.index(name)] *= HARTREE_TO_MEV
        for name, reference in ATOM_REFERENCE.items():
            j = names.index(name)
            out[:, j] = (out[:, j] - counts @ np.asarray(reference)) * HARTREE_TO_MEV
        result: FloatArray = out
        return result


def _package_dir() -> Path:
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"QM9 is read from the tables that the package {PACKAGE!r} ships, but it is not "
            f"installed. Install it with `{INSTALL}`."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def source_files() -> list[Path]:
    """The three CSV files of QM9 inside the installed qm9pack package."""
    folder = _package_dir() / "data"
    paths = [folder / name for name in CSV_FILES]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataError(
            f"QM9's table(s) {', '.join(missing)} are missing from the installed {PACKAGE}. "
            f"Reinstall it: `pip install --force-reinstall {PACKAGE}`."
        )
    return paths


def _parse_csv(path: Path) -> tuple[list[int], list[int], list[int], list[float], list[float]]:
    """(index, atom counts, atomic numbers, flat coordinates, flat raw targets) of one file."""
    number = dict(zip(ELEMENTS, ATOMIC_NUMBERS, strict=True))
    index: list[int] = []
    counts: list[int] = []
    z: list[int] = []
    pos: list[float] = []
    raw: list[float] = []
    target_columns = [c for c, _ in TARGETS.values()]
    csv.field_size_limit(sys.maxsize)
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(
                f"Expected QM9's table {path} to have the column(s) {', '.join(missing)}; "
                f"found {reader.fieldnames}. Reinstall {PACKAGE} "
                f"(`pip install --force-reinstall {PACKAGE}`)."
            )
        for line, row in enumerate(reader, start=2):
            try:
                elements = ast.literal_eval(row["Elements"])
                xyz = ast.literal_eval(row["XYZ_Ang"])
                n = int(row["N_atoms"])
                if len(elements) != n or len(xyz) != n or any(len(p) != 3 for p in xyz):
                    raise ValueError(f"{n} atoms, {len(elements)} elements, {len(xyz)} positions")
                z.extend(number[e] for e in elements)
                pos.extend(float(c) for p in xyz for c in p)
                raw.extend(float(row[c]) for c in target_columns)
                index.append(int(row["Index"]))
                counts.append(n)
            except (ValueError, SyntaxError, KeyError, TypeError) as exc:
                raise DataError(
                    f"QM9's table {path}, line {line}, cannot be read: {exc!r}. Reinstall "
                    f"{PACKAGE} (`pip install --force-reinstall {PACKAGE}`)."
                ) from None
    return index, counts, z, pos, raw


def _digest(source: QM9Source) -> str:
    """SHA-256 of index, offsets, atomic numbers (int64), positions and raw targets (float64)."""
    digest = hashlib.sha256()
    for array, dtype in (
        (source.index, np.int64),
        (source.offsets, np.int64),
        (source.z, np.int64),
        (source.pos, np.float64),
        (source.raw, np.float64),
    ):
        digest.update(np.ascontiguousarray(array, dtype=dtype).tobytes())
    return digest.hexdigest()


def _verify(source: QM9Source, where: str) -> None:
    m, a = len(source.index), len(source.z)
    if m != NUM_MOLECULES or a != NUM_ATOMS:
        raise DataError(
            f"Expected {where} to hold {NUM_MOLECULES} molecules of {NUM_ATOMS} atoms in all, "
            f"found {m} molecules of {a} atoms."
        )
    found = _digest(source)
    if found != SOURCE_SHA256:
        raise DataError(f"Expected {where} to have SHA-256 {SOURCE_SHA256}, found {found}.")


def parse_source(paths: Sequence[Path]) -> QM9Source:
    """Parse QM9's CSV files (in order) into a :class:`QM9Source`, without verifying it."""
    index: list[int] = []
    counts: list[int] = []
    z: list[int] = []
    pos: list[float] = []
    raw: list[float] = []
    for path in paths:
        part_index, part_counts, part_z, part_pos, part_raw = _parse_csv(path)
        index += part_index
        counts += part_counts
        z += part_z
        pos += part_pos
        raw += part_raw
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return QM9Source(
        index=np.asarray(index, dtype=np.int64),
        offsets=offsets,
        z=np.asarray(z, dtype=np.int64),
        pos=np.asarray(pos, dtype=np.float64).reshape(-1, 3),
        raw=np.asarray(raw, dtype=np.float64).reshape(-1, len(TARGETS)),
    )


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/polytask``, or ``~/.cache/polytask``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "polytask"


def _cache_path(paths: Sequence[Path], cache_dir: Path) -> Path:
    key = hashlib.sha256(f"v{CACHE_VERSION}".encode())
    for path in paths:
        stat = path.stat()
        key.update(f"|{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return cache_dir / f"qm9-{key.hexdigest()[:16]}.npz"


def _read_cache(path: Path) -> QM9Source | None:
    """The cached source, or None when the file is absent, unreadable or fails verification."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as content:
            source = QM9Source(
                index=content["index"].astype(np.int64),
                offsets=content["offsets"].astype(np.int64),
                z=content["z"].astype(np.int64),
                pos=content["pos"].astype(np.float64),
                raw=content["raw"].astype(np.float64),
            )
        _verify(source, f"the cache {path}")
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, DataError) as exc:
        log.warning(f"ignoring the QM9 cache {path} ({exc}); parsing the tables again")
        return None
    return source


def _write_cache(source: QM9Source, path: Path) -> None:
    """Write atomically (a temporary file renamed), so a reader never sees half a cache."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(handle, "wb") as out:
                np.savez_compressed(
                    out,
                    index=source.index.astype(np.int32),
                    offsets=source.offsets,
                    z=source.z.astype(np.int8),
                    pos=source.pos,
                    raw=source.raw,
                )
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        log.warning(f"could not write the QM9 cache {path} ({exc}); it will be parsed again")


def load_source(cache_dir: str | os.PathLike[str] | None = None) -> QM9Source:
    """Every molecule of QM9, verified: from the cache if it is valid, else parsed and cached.

    Raises:
        DataError: qm9pack is not installed, its tables are missing or do not hold the
            expected molecules (count, columns, checksum).
    """
    paths = source_files()
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache = _cache_path(paths, folder)
    source = _read_cache(cache)
    if source is not None:
        return source
    log.info(f"parsing QM9 from {paths[0].parent} (once; cached in {cache})")
    source = parse_source(paths)
    _verify(source, f"the QM9 tables in {paths[0].parent} ({PACKAGE})")
    _write_cache(source, cache)
    return source


_EDGE_TEMPLATES: dict[int, Tensor] = {}


def complete_edges(n: int) -> Tensor:
    """Every ordered pair ``(source, target)`` of distinct nodes of ``0..n-1``, ``(2, n(n-1))``."""
    edges = _EDGE_TEMPLATES.get(n)
    if edges is None:
        source = torch.arange(n).repeat_interleave(n)
        target = torch.arange(n).repeat(n)
        keep = source != target
        edges = _EDGE_TEMPLATES[n] = torch.stack([source[keep], target[keep]])
    return edges


def node_features(z: Tensor) -> Tensor:
    """A one-hot of the element (H, C, N, O, F) and the atomic number, ``(n, 6)`` float32."""
    numbers = torch.tensor(ATOMIC_NUMBERS)
    one_hot = (z[:, None] == numbers[None, :]).float()
    return torch.cat([one_hot, z[:, None].float()], dim=1)


class QM9Dataset(Dataset[dict[str, Any]]):
    """Some molecules of QM9 as graph samples (see :mod:`polytask.data.graphs`).

    Sample ``i`` is ``{"input": {"x", "edge_index", "edge_attr"}, "targets": {task: (1,)
    float64}}`` for the molecule ``molecules[i]`` (a row of the source), targets in the
    reported units. Batches come from :meth:`collate`.
    """

    def __init__(
        self, source: QM9Source, molecules: IntArray, targets: Mapping[str, FloatArray]
    ) -> None:
        self.molecules = np.asarray(molecules, dtype=np.int64)
        self.index = source.index[self.molecules]
        self._offsets = source.offsets
        self._z = torch.from_numpy(source.z)
        self._pos = torch.from_numpy(source.pos.astype(np.float32))
        self._targets = {
            name: torch.from_numpy(np.ascontiguousarray(values[self.molecules, None]))
            for name, values in targets.items()
        }

    def __len__(self) -> int:
        return len(self.molecules)

    def __getitem__(self, i: int) -> dict[str, Any]:
        m = int(self.molecules[i])
        start, stop = int(self._offsets[m]), int(self._offsets[m + 1])
        z, pos = self._z[start:stop], self._pos[start:stop]
        edges = complete_edges(stop - start)
        distance = (pos[edges[0]] - pos[edges[1]]).norm(dim=1, keepdim=True)
        return {
            "input": {"x": node_features(z), "edge_index": edges, "edge_attr": distance},
            "targets": {name: values[i] for name, values in self._targets.items()},
        }

    def collate(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Batch graph samples into one disjoint graph (:func:`collate_graphs`)."""
        return collate_graphs(samples)


class StandardizedMSELoss:
    """Mean squared error between a prediction read as standardised and the standardised target:
    ``mean((pred - (target - mean) / std)^2)`` over the labelled samples."""

    def __init__(self, mean: float, std: float) -> None:
        self.mean, self.std = mean, std

    def __call__(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        scaled = ((target.double() - self.mean) / self.std).to(pred.dtype).reshape(pred.shape)
        values = (pred - scaled).square()
        if mask is None:
            return values.mean()
        weight = mask.to(values.dtype).reshape(-1, *([1] * (values.dim() - 1))).expand_as(values)
        return (values * weight).sum() / weight.sum().clamp_min(1.0)


def unstandardize(pred: Tensor, *, mean: float, std: float) -> Tensor:
    """A standardised prediction in the target's units, in float64: ``pred * std + mean``."""
    return pred.double() * std + mean


class MeanAbsoluteError(RegressionMetric):
    """The MAE alone (the papers' QM9 metric), exact over the split; lower is better."""

    def __init__(self) -> None:
        super().__init__()
        self.higher_is_better = {"mae": False}

    def compute(self) -> dict[str, float]:
        return {"mae": super().compute()["mae"]}


def _make_task(name: str, mean: float, std: float) -> Task:
    column, unit = TARGETS[name]
    return Task(
        name=name,
        loss=StandardizedMSELoss(mean, std),
        metrics={"mae": MeanAbsoluteError},
        output_dim=1,
        postprocess=partial(unstandardize, mean=mean, std=std),
        kind="regression",
        description=f"{column} in {unit}; the output is standardised with the train split",
        extra={"unit": unit, "mean": mean, "std": std},
    )


def _split_size(name: str, value: object, total: int) -> int:
    """An int count, or a fraction in (0, 1) of ``total`` (rounded, at least 1)."""
    if isinstance(value, float) and 0.0 < value < 1.0:
        return max(1, round(value * total))
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ConfigError(
            f"Expected option `{name}` to be an integer >= 1 or a fraction in (0, 1), "
            f"found {value!r}."
        )
    return int(value)


def _check_targets(targets: Sequence[str] | None) -> tuple[str, ...]:
    if targets is None:
        return tuple(TARGETS)
    if isinstance(targets, str) or not targets:
        raise ConfigError(
            f"Expected option `targets` to be a non-empty list of names among "
            f"{', '.join(TARGETS)}, found {targets!r}."
        )
    for name in targets:
        if name not in TARGETS:
            raise ConfigError(
                f"option `targets` names unknown target {name!r}.{did_you_mean(str(name), TARGETS)}"
                f" QM9's targets: {', '.join(TARGETS)}."
            )
    if len(set(targets)) != len(targets):
        raise ConfigError(f"option `targets` names a target twice: {list(targets)}.")
    return tuple(name for name in TARGETS if name in targets)


@DATASETS.register("qm9")
def qm9(
    *,
    subset: int | None = 3000,
    n_val: int | float = 0.1,
    n_test: int | float = 0.1,
    seed: int = 0,
    targets: Sequence[str] | None = None,
    cache_dir: str | None = None,
) -> DataBundle:
    """Build the QM9 benchmark (see the module docstring).

    Args:
        subset: use this many molecules, drawn at random (seeded); ``null`` or 0: all 130,831.
        n_val, n_test: validation / test molecules: a count, or a fraction in (0, 1) of the
            molecules used; the rest train.
        seed: seeds the subset and the split, >= 0.
        targets: the tasks, a subset of the 11 names of :data:`TARGETS` (default: all), kept
            in the papers' order.
        cache_dir: where the parsed tables are cached (default ``$XDG_CACHE_HOME/polytask``
            or ``~/.cache/polytask``).

    Raises:
        ConfigError: an option is out of range.
        DataError: qm9pack is not installed or its tables are not the expected ones.
    """
    seed = check_int("seed", seed, 0)
    size = NUM_MOLECULES if subset is None else check_int("subset", subset, 0) or NUM_MOLECULES
    if size > NUM_MOLECULES:
        raise ConfigError(
            f"Expected option `subset` to be at most {NUM_MOLECULES} (QM9's molecules), "
            f"found {size}."
        )
    sizes = {"val": _split_size("n_val", n_val, size), "test": _split_size("n_test", n_test, size)}
    sizes["train"] = size - sizes["val"] - sizes["test"]
    if sizes["train"] < 2:
        raise ConfigError(
            f"options `n_val` ({sizes['val']}) and `n_test` ({sizes['test']}) leave "
            f"{sizes['train']} of {size} molecules to train on; at least 2 are needed."
        )
    names = _check_targets(targets)

    source = load_source(cache_dir)
    rng = np.random.default_rng([seed, 9])
    chosen = rng.permutation(NUM_MOLECULES)[:size]
    molecules = {
        "test": chosen[: sizes["test"]],
        "val": chosen[sizes["test"] : sizes["test"] + sizes["val"]],
        "train": chosen[sizes["test"] + sizes["val"] :],
    }
    every = source.targets()
    columns = [list(TARGETS).index(name) for name in names]
    values = {name: every[:, j] for name, j in zip(names, columns, strict=True)}
    train = every[molecules["train"]][:, columns]
    mean = dict(zip(names, (float(v) for v in train.mean(axis=0)), strict=True))
    std = dict(zip(names, (float(v) for v in train.std(axis=0, ddof=1)), strict=True))
    bad = [name for name in names if not math.isfinite(std[name]) or std[name] <= 0.0]
    if bad:
        raise ConfigError(
            f"target(s) {', '.join(bad)} are constant on the {sizes['train']} training molecules; "
            "use a larger `subset`."
        )
    tasks = {name: _make_task(name, mean[name], std[name]) for name in names}
    splits = {split: QM9Dataset(source, molecules[split], values) for split in molecules}
    return DataBundle(
        tasks=tasks,
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        input_shape=(NODE_FEATURES,),
        info={
            "source": f"{PACKAGE} ({', '.join(CSV_FILES)})",
            "source_size": NUM_MOLECULES,
            "subset": size,
            "seed": seed,
            "sizes": sizes,
            "targets": list(names),
            "units": {name: TARGETS[name][1] for name in names},
            "target_mean": mean,
            "target_std": std,
            "node_features": NODE_FEATURES,
            "edge_features": EDGE_FEATURES,
            "graph": "complete graph, edge feature = interatomic distance (Angstrom)",
        },
    )
