"""symphony_dask: Symphony single-cell reference building and query mapping on Dask.

Build a compressed, Harmony-integrated reference once; map new query cells onto it in seconds and
transfer annotations from their nearest reference cells (Kang et al., Nat. Commun. 2021).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("symphony_dask")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

from .annotate import evaluate, transfer_labels
from .build import build_reference
from .harmony import HarmonyResult, harmonize
from .mapping import map_query
from .reference import Reference, load_reference

__all__ = [
    "HarmonyResult",
    "Reference",
    "build_reference",
    "evaluate",
    "harmonize",
    "load_reference",
    "map_query",
    "transfer_labels",
]
