"""symphony_dask: Symphony single-cell reference building and query mapping on Dask.

Build a compressed, Harmony-integrated reference once; map new query cells onto it in seconds and
transfer annotations from their nearest reference cells (Kang et al., Nat. Commun. 2021).

The public functions are imported on first use (PEP 562), so that ``import symphony_dask`` and the
command line's ``--help`` do not load dask and anndata until they are needed.
"""

import importlib as _importlib
import importlib.metadata as _metadata
import typing as _typing

try:
    __version__ = _metadata.version("symphony_dask")
except _metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

#: Public name -> module that defines it; ``None`` for a public module (``sd.pl``, ``sd.datasets``).
_PUBLIC = {
    "HarmonyResult": "_harmony.result",
    "Reference": "_reference.model",
    "build_reference": "_reference.build",
    "cluster_from_file": "_dask.dashboard",
    "datasets": None,
    "evaluate": "_mapping.annotate",
    "harmonize": "_harmony.harmonize",
    "knn_corr": "_mapping.metrics",
    "lisi": "_mapping.metrics",
    "load_reference": "_reference.store",
    "map_query": "_mapping.query",
    "per_cell_mapping_metric": "_mapping.metrics",
    "per_cluster_mapping_metric": "_mapping.metrics",
    "pl": None,
    "read_symphony_rds": "_reference.rds",
    "reference_from_anndata": "_reference.from_anndata",
    "transfer_labels": "_mapping.annotate",
    "transfer_values": "_mapping.annotate",
    "within_query_knn_corr": "_mapping.metrics",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> object:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'symphony_dask' has no attribute {name!r}")
    module = _PUBLIC[name]
    value = _importlib.import_module(f".{name if module is None else module}", __name__)
    if module is not None:
        value = getattr(value, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return [*__all__, "__version__"]


if _typing.TYPE_CHECKING:
    from symphony_dask import datasets, pl
    from symphony_dask._dask.dashboard import cluster_from_file
    from symphony_dask._harmony.harmonize import harmonize
    from symphony_dask._harmony.result import HarmonyResult
    from symphony_dask._mapping.annotate import evaluate, transfer_labels, transfer_values
    from symphony_dask._mapping.metrics import (
        knn_corr,
        lisi,
        per_cell_mapping_metric,
        per_cluster_mapping_metric,
        within_query_knn_corr,
    )
    from symphony_dask._mapping.query import map_query
    from symphony_dask._reference.build import build_reference
    from symphony_dask._reference.from_anndata import reference_from_anndata
    from symphony_dask._reference.model import Reference
    from symphony_dask._reference.rds import read_symphony_rds
    from symphony_dask._reference.store import load_reference
