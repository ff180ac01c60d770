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
    "HarmonyResult": "harmony_driver",
    "Reference": "reference",
    "build_reference": "build",
    "datasets": None,
    "evaluate": "annotate",
    "harmonize": "harmony",
    "knn_corr": "metrics",
    "lisi": "metrics",
    "load_reference": "reference",
    "map_query": "mapping",
    "per_cell_mapping_metric": "metrics",
    "per_cluster_mapping_metric": "metrics",
    "pl": None,
    "read_symphony_rds": "rds",
    "reference_from_anndata": "from_anndata",
    "transfer_labels": "annotate",
    "transfer_values": "annotate",
    "within_query_knn_corr": "metrics",
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
    from . import datasets, pl
    from .annotate import evaluate, transfer_labels, transfer_values
    from .build import build_reference
    from .from_anndata import reference_from_anndata
    from .harmony import harmonize
    from .harmony_driver import HarmonyResult
    from .mapping import map_query
    from .metrics import knn_corr, lisi, per_cell_mapping_metric, per_cluster_mapping_metric, within_query_knn_corr
    from .rds import read_symphony_rds
    from .reference import Reference, load_reference
