"""What the test modules share besides fixtures: paths, R Symphony's build parameters (in Python and on
the command line), the oracle's reader and the reference it gives, fresh references from another's
elements, ``symphony-dask build`` and ``map`` arguments, and the local clusters that the
``local_cluster`` fixtures start.

Imported as ``from _helpers import ...``: pytest puts tests/ on ``sys.path`` (its default ``prepend``
import mode, tests/ being no package), as it does for conftest.py, which keeps only fixtures.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

import symphony_dask as sd

if TYPE_CHECKING:
    from distributed import Client, LocalCluster

#: The repository's root.
ROOT = Path(__file__).parents[1]
#: The test data (tests/data/README.md says where each set comes from).
DATA = ROOT / "tests" / "data"
#: R Symphony's outputs for the split of the bundled PBMCs into reference and query (splitA).
ORACLE = DATA / "symphony_r_oracle_splitA"
#: The cluster configuration files that the repository ships.
CLUSTER_CONFIGS = ROOT / "cluster_configs"

#: R Symphony's buildReference parameters of the oracle run (splitA).
R_BUILD = dict(normalize=False, n_hvg=1000, hvg_batch_key="donor", n_pcs=20, n_clusters=100, theta=2.0)
#: R_BUILD on the ``symphony-dask build`` command line (batch key ``donor``), but for ``--no-normalize``:
#: add it for the log-normalized PBMCs, leave it out for counts (20 PCs and theta 2 are the defaults).
CLI_BUILD = ["--batch-key", "donor", "--n-hvg", "1000", "--hvg-batch-key", "donor", "--n-clusters", "100"]

#: Dask settings for workers that must not spill, pause or be stopped short of their memory limit: a
#: worker that runs out of memory is killed (at 95 %), so that the tests see what used the memory.
NO_SPILL = {
    "distributed.worker.memory.target": False,
    "distributed.worker.memory.spill": False,
    "distributed.worker.memory.pause": False,
    "distributed.worker.memory.terminate": 0.95,
}

#: What the ``local_cluster`` fixtures give ``LocalCluster`` unless told otherwise.
LOCAL_CLUSTER_DEFAULTS = {"dashboard_address": ":0", "threads_per_worker": 1, "processes": True}


class Oracle:
    """Reader of the R Symphony outputs; per-cell matrices come back cells x components."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ref_cells = (root / "ref_cells.txt").read_text().split()
        self.query_cells = (root / "query_cells.txt").read_text().split()

    def table(self, name: str, **kwargs) -> pd.DataFrame:
        return pd.read_csv(self.root / f"{name}.csv.gz", **kwargs)

    def matrix(self, name: str) -> np.ndarray:
        return self.table(name, index_col=0).to_numpy()

    def per_cell(self, name: str, cells: list[str]) -> np.ndarray:
        m = self.table(name, index_col=0)
        return m.T.loc[cells].to_numpy()

    @property
    def vargenes(self) -> pd.DataFrame:
        return self.table("vargenes")


def oracle_reference(oracle: Oracle, pbmcs, **kwargs: Any) -> sd.Reference:
    """R's reference elements through Reference.from_arrays, with R's corrected embedding and the cells'
    obs; ``kwargs`` go to from_arrays too (``pca_moments=...``)."""
    vg = oracle.vargenes
    return sd.Reference.from_arrays(
        vg["symbol"],
        vg["mean"],
        vg["stddev"],
        oracle.matrix("loadings_U"),
        oracle.matrix("centroids_Ycos"),
        oracle.matrix("cache_Nr").ravel(),
        oracle.matrix("cache_C"),
        embedding=oracle.per_cell("ref_Z_corr", oracle.ref_cells),
        obs=pbmcs.obs.loc[oracle.ref_cells],
        **kwargs,
    )


#: The elements every reference has: Reference.from_arrays's positional arguments, in their order.
ELEMENTS = ("genes", "mean", "std", "loadings", "centroids", "cluster_sizes", "compression")


def from_elements(reference: sd.Reference, *, cells: bool = True, **kwargs: Any) -> sd.Reference:
    """A fresh Reference (no neighbor index, no params) through Reference.from_arrays from the
    :data:`ELEMENTS` of ``reference`` and, unless ``cells=False`` (a minimal reference, as
    ``--minimal`` saves), its embedding and obs. ``kwargs`` replace any of these or add others."""
    given = {name: getattr(reference, name) for name in ELEMENTS}
    if cells:
        given.update(embedding=reference.embedding, obs=reference.obs)
    return sd.Reference.from_arrays(**{**given, **kwargs})


def build_argv(data: Path | str, out: Path | str, *extra: str) -> list[str]:
    """``symphony-dask build`` arguments: the cells, the reference store to write, then ``extra``."""
    return ["build", str(data), "--out", str(out), *extra]


def map_argv(reference: Path, query: Path | str, out: Path, *extra: str) -> list[str]:
    """``symphony-dask map`` arguments: the reference store, the query file(s), the output, then ``extra``."""
    return ["map", "--reference", str(reference), "--query", str(query), "--out", str(out), *extra]


class LocalClusters:
    """Starts local Dask clusters (``distributed.LocalCluster``) with test defaults, each with a client
    unless told not to; :meth:`close` closes them all, newest first (a client before its cluster).

    The defaults (:data:`LOCAL_CLUSTER_DEFAULTS`): the dashboard on a free port, one thread per worker,
    worker processes (as LocalCluster's own default). Anything else, ``n_workers``, ``memory_limit`` or
    ``worker_class`` say, goes to LocalCluster as given.
    """

    def __init__(self) -> None:
        self._stack = contextlib.ExitStack()

    def __call__(self, *, client: bool = True, **kwargs: Any) -> tuple[LocalCluster, Client | None]:
        """A started cluster and its client (the default client from now on), or None with ``client=False``."""
        from distributed import Client, LocalCluster

        # closed by close(), which either may have been already (``with cluster, client:`` in a test)
        cluster = LocalCluster(**{**LOCAL_CLUSTER_DEFAULTS, **kwargs})
        self._stack.callback(cluster.close)
        if not client:
            return cluster, None
        started = Client(cluster)
        self._stack.callback(started.close)
        return cluster, started

    def close(self) -> None:
        self._stack.close()


class OnMessage(logging.Handler):
    """Calls ``action`` once, when a log message starting with ``prefix`` is emitted."""

    def __init__(self, prefix: str, action) -> None:
        super().__init__(logging.INFO)
        self.prefix, self.action, self.fired = prefix, action, False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.fired and record.getMessage().startswith(self.prefix):
            self.fired = True
            self.action()
