"""symphony_dask: Symphony single-cell reference building and query mapping on Dask.

Build a compressed, Harmony-integrated reference once; map new query cells onto it in seconds and
transfer annotations from their nearest reference cells (Kang et al., Nat. Commun. 2021).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("symphony_dask")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

from .annotate import evaluate, transfer_labels, transfer_values
from .build import build_reference
from .harmony import HarmonyResult, harmonize
from .mapping import map_query
from .metrics import knn_corr, lisi, per_cell_mapping_metric, per_cluster_mapping_metric, within_query_knn_corr
from .reference import Reference, load_reference

__all__ = [
    "HarmonyResult",
    "Reference",
    "build_reference",
    "evaluate",
    "harmonize",
    "knn_corr",
    "lisi",
    "load_reference",
    "map_query",
    "per_cell_mapping_metric",
    "per_cluster_mapping_metric",
    "transfer_labels",
    "transfer_values",
    "within_query_knn_corr",
]
