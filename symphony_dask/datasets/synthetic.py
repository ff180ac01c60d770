"""A realistic synthetic single-cell atlas, written straight to a chunked AnnData zarr (v3) store.

It serves benchmarks and tests at sizes no real data set here has. The whole matrix is never held:
chunks of cells are generated (in parallel processes) from a seed and the chunk index alone, and
appended to the store's CSR arrays.

Model (per cell c of type t from donor s, gene g):

- gene base proportions ``p_g``: log-normal (a few highly expressed genes, a long tail);
- ``n_types`` cell types, each with a marker program: 150 genes up 3-12x, 150 down 2-5x;
- donors: multiplicative gene effects ``exp(N(0, 0.25))`` per (donor, gene) -- the batch effect -- and
  their own cell-type composition (Dirichlet around a shared one);
- library sizes: log-normal (median 2,500 UMIs, sd 0.5 on the log scale);
- counts: negative binomial with mean ``lib_c * p_g * program_tg * donor_sg`` (normalized to sum to
  ``lib_c``) and dispersion ``theta = 4``. Genes whose expected count can exceed 0.5 (at 4x the
  median library) are drawn as gamma-Poisson mixtures; the rest, whose NB variance ``mu + mu^2/4``
  is within 12% of Poisson's, are drawn as one Poisson total per cell spread by their proportions.

    python -m symphony_dask.datasets.synthetic --cells 1400000 --out data/atlas_1.4M.zarr
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

THETA = 4.0
LIBRARY_MEDIAN = 2500
DENSE_MEAN = 0.5  # expected count (at 4x the median library) above which a gene is drawn as a negative binomial
CHUNK = 10_000


@dataclass
class Model:
    """The generative model of a synthetic atlas: its gene, cell-type and donor parameters, and its chunks.

    Parameters
    ----------
    n_cells, n_genes
        Size of the atlas.
    n_types
        Cell types, each with its marker program.
    n_donors
        Donors (the batches), each a contiguous run of cells with its own gene effects and composition.
    seed
        The parameters are drawn from ``(seed, 0)``, the chunk of index ``i`` from ``(seed, 1, i)``.
    """

    n_cells: int
    n_genes: int
    n_types: int
    n_donors: int
    seed: int

    def __post_init__(self) -> None:
        rng = np.random.default_rng([self.seed, 0])
        g, t, s = self.n_genes, self.n_types, self.n_donors
        base = np.exp(rng.normal(0.0, 1.6, g))
        self.base = base / base.sum()
        program = np.ones((t, g))
        for k in range(t):
            genes = rng.choice(g, 300, replace=False)
            program[k, genes[:150]] = rng.uniform(3, 12, 150)
            program[k, genes[150:]] = 1.0 / rng.uniform(2, 5, 150)
        self.program = program
        self.donor_effect = np.exp(rng.normal(0.0, 0.25, (s, g)))
        shared = rng.dirichlet(np.full(t, 2.0))
        self.composition = np.array([rng.dirichlet(shared * 30 + 0.1) for _ in range(s)])
        # genes that may have a non-negligible expected count in some cell
        top = (self.base[None, :] * program).max(axis=0) * self.donor_effect.max(axis=0) * 4 * LIBRARY_MEDIAN
        self.dense_genes = np.flatnonzero(top > DENSE_MEAN)
        self.sparse_genes = np.flatnonzero(top <= DENSE_MEAN)

    def donor_of(self, cells: np.ndarray) -> np.ndarray:
        """Donors own contiguous runs of cells, as samples do in real atlases."""
        return (cells * self.n_donors) // self.n_cells

    def chunk(self, index: int) -> dict:
        """Cells ``index * CHUNK`` to the next chunk: CSR arrays and their annotations."""
        rng = np.random.default_rng([self.seed, 1, index])
        cells = np.arange(index * CHUNK, min((index + 1) * CHUNK, self.n_cells))
        n = len(cells)
        donor = self.donor_of(cells)
        cum = np.cumsum(self.composition[donor], axis=1)
        ctype = (rng.random(n)[:, None] > cum).sum(axis=1).clip(0, self.n_types - 1)
        lib = np.exp(rng.normal(np.log(LIBRARY_MEDIAN), 0.5, n))
        rows = []
        for t in range(self.n_types):
            for s in np.unique(donor[ctype == t]):
                sel = np.flatnonzero((ctype == t) & (donor == s))
                prop = self.base * self.program[t] * self.donor_effect[s]
                prop /= prop.sum()
                rows.append((sel, prop))
        parts, order = [], []
        for sel, prop in rows:
            mu = lib[sel, None] * prop[None, self.dense_genes]
            dense = sp.csr_matrix(rng.poisson(rng.gamma(THETA, mu / THETA)).astype(np.float32))
            dense = sp.csr_matrix(
                (dense.data, self.dense_genes[dense.indices], dense.indptr), shape=(len(sel), self.n_genes)
            )
            sparse_p = prop[self.sparse_genes]
            totals = rng.poisson(lib[sel] * sparse_p.sum())
            cdf = np.cumsum(sparse_p) / sparse_p.sum()
            picks = np.searchsorted(cdf, rng.random(totals.sum()), side="right").clip(0, len(cdf) - 1)
            owner = np.repeat(np.arange(len(sel)), totals)
            tail = sp.coo_matrix(
                (np.ones(len(picks), dtype=np.float32), (owner, self.sparse_genes[picks])),
                shape=(len(sel), self.n_genes),
            ).tocsr()  # duplicates are summed
            parts.append(dense + tail)
            order.append(sel)
        x = sp.vstack(parts).tocsr()[np.argsort(np.concatenate(order))]
        x.sort_indices()
        return {
            "index": index,
            "data": x.data.astype(np.float32),
            "indices": x.indices.astype(np.int32),
            "nnz": np.diff(x.indptr),
            "donor": donor,
            "cell_type": ctype,
            "total_counts": np.asarray(x.sum(axis=1)).ravel(),
        }


def write_synthetic_atlas(
    path: str | Path,
    n_cells: int,
    *,
    n_genes: int = 20_000,
    n_types: int = 20,
    n_donors: int | None = None,
    seed: int = 0,
    workers: int = 2,
) -> dict:
    """Write a synthetic atlas of raw counts to ``path`` (a new AnnData zarr v3 store).

    Parameters
    ----------
    path
        The store to create (an existing path is an error).
    n_cells, n_genes, n_types
        Size and number of cell types.
    n_donors
        Donors (the batches), each a contiguous run of cells; default one per 5,000 cells (at least 4).
    seed
        Every chunk of 10,000 cells is drawn from ``(seed, chunk index)`` alone.
    workers
        Processes generating chunks in parallel.

    Returns
    -------
    dict
        A summary: cells, genes, donors, nonzeros (per cell), seconds.
    """
    import anndata as ad
    import pandas as pd
    import zarr

    n_donors = n_donors or max(4, n_cells // 5_000)
    model = Model(n_cells, n_genes, n_types, n_donors, seed)
    start = time.perf_counter()
    root = zarr.open_group(str(path), mode="w-", zarr_format=3)
    x = root.create_group("X")
    x.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": [n_cells, n_genes]})
    data = x.create_array("data", shape=(0,), dtype="float32", chunks=(4_000_000,))
    indices = x.create_array("indices", shape=(0,), dtype="int32", chunks=(4_000_000,))
    indptr = [np.zeros(1, dtype=np.int64)]
    obs = {"donor": [], "cell_type": [], "total_counts": []}
    n_chunks = -(-n_cells // CHUNK)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for part in pool.map(model.chunk, range(n_chunks)):
            data.append(part["data"])
            indices.append(part["indices"])
            indptr.append(indptr[-1][-1] + np.cumsum(part["nnz"]))
            for key in obs:
                obs[key].append(part[key])
    indptr = np.concatenate(indptr)
    x.create_array("indptr", data=indptr, chunks=(1_000_000,))
    frame = pd.DataFrame(
        {
            "donor": pd.Categorical([f"donor_{d:04d}" for d in np.concatenate(obs["donor"])]),
            "cell_type": pd.Categorical([f"type_{t:02d}" for t in np.concatenate(obs["cell_type"])]),
            "total_counts": np.concatenate(obs["total_counts"]),
        },
        index=pd.Index([f"cell_{i}" for i in range(n_cells)]),
    )
    with ad.settings.override(zarr_write_format=3, auto_shard_zarr_v3=False):
        ad.io.write_elem(root, "obs", frame)
        ad.io.write_elem(root, "var", pd.DataFrame(index=[f"gene_{g:05d}" for g in range(n_genes)]))
        for name in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            ad.io.write_elem(root, name, {})
    root.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
    return {
        "path": str(path),
        "cells": n_cells,
        "genes": n_genes,
        "donors": n_donors,
        "cell_types": n_types,
        "nonzeros": int(indptr[-1]),
        "nonzeros_per_cell": round(float(indptr[-1]) / n_cells, 1),
        "seconds": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    """Command line: write a synthetic atlas of ``--cells`` cells to ``--out`` and print its summary (JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, required=True)
    parser.add_argument("--genes", type=int, default=20_000)
    parser.add_argument("--types", type=int, default=20)
    parser.add_argument("--donors", type=int, default=None, help="default: one per 5,000 cells (at least 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    summary = write_synthetic_atlas(
        args.out,
        args.cells,
        n_genes=args.genes,
        n_types=args.types,
        n_donors=args.donors,
        seed=args.seed,
        workers=args.workers,
    )
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
