"""Real data bundled with symphony_dask.

``pbmcs_small``: 1,200 PBMCs from three 10x technologies (3'v1, 3'v2, 5'; ``obs['donor']``) with 9
cell types, Symphony's own example data (R package symphony 0.1.1, GPL >= 3): a 1,200-cell
subsample of the 10x PBMC datasets of the Symphony paper (Kang et al. 2021).
"""

from __future__ import annotations

from importlib.resources import files

import anndata as ad


def pbmcs_small() -> ad.AnnData:
    """1,200 PBMCs x 1,767 genes from three 10x technologies, with cell types.

    Returns
    -------
    AnnData
        ``X``: log(CP10K+1) values exactly as Symphony's ``pbmcs_exprs_small`` (normalized by each
        cell's total UMI count over all genes of the original data, ``obs['nUMI']``);
        ``layers['counts']``: the raw UMI counts; ``obs``: ``donor`` (the technology: 3pv1, 3pv2,
        5p), ``cell_type`` (9 labels), ``cell_type_broad`` (7), ``nUMI``, ``nGene``, ``percent_mito``.
    """
    return ad.read_h5ad(files(__package__).joinpath("pbmcs_small.h5ad"))
