"""Data sets: the sample contract, the registry of builders and the bundled benchmarks.

Importing this package registers the built-in builders in :data:`DATASETS`.
"""

from __future__ import annotations

from . import cityscapes as cityscapes
from . import decathlon as decathlon
from . import multidigits as multidigits
from . import multimnist as multimnist
from . import nyuv2 as nyuv2
from . import penguins as penguins
from . import qm9 as qm9
from . import scenes as scenes
from . import solarflare as solarflare
from . import yeast as yeast
from .base import DATASETS, SPLITS, DataBundle
from .tensor import TensorMTLDataset

__all__ = ["DATASETS", "SPLITS", "DataBundle", "TensorMTLDataset"]
