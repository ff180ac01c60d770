"""symphony_dask: Symphony single-cell reference building and query mapping on Dask.

Build a compressed, Harmony-integrated reference once; map new query cells onto it in seconds and
transfer annotations from their nearest reference cells (Kang et al., Nat. Commun. 2021).

The public functions are imported on first use (PEP 562), so that ``import symphony_dask`` and the
command line's ``--help`` do not load dask and anndata until they are needed.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("symphony_dask")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

#: Public name -> module that defines it (the names of ``__all__``).
_PUBLIC = {
    "HarmonyResult": "harmony_driver",
    "Reference": "reference",
    "build_reference": "build",
    "evaluate": "annotate",
    "harmonize": "harmony",
    "knn_corr": "metrics",
    "lisi": "metrics",
    "load_reference": "reference",
    "map_query": "mapping",
    "per_cell_mapping_metric": "metrics",
    "per_cluster_mapping_metric": "metrics",
    "read_symphony_rds": "rds",
    "reference_from_anndata": "from_anndata",
    "transfer_labels": "annotate",
    "transfer_values": "annotate",
    "within_query_knn_corr": "metrics",
}

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
    "read_symphony_rds",
    "reference_from_anndata",
    "transfer_labels",
    "transfer_values",
    "within_query_knn_corr",
]


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'symphony_dask' has no attribute {name!r}")
    value = getattr(import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from .annotate import evaluate, transfer_labels, transfer_values
    from .build import build_reference
    from .from_anndata import reference_from_anndata
    from .harmony import harmonize
    from .harmony_driver import HarmonyResult
    from .mapping import map_query
    from .metrics import knn_corr, lisi, per_cell_mapping_metric, per_cluster_mapping_metric, within_query_knn_corr
    from .rds import read_symphony_rds
    from .reference import Reference, load_reference
