"""Draw the README's figures (docs/figures/) from the bundled PBMCs: python examples/readme_figures.py"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

import symphony_dask as sd
from symphony_dask import pl
from symphony_dask.datasets import pbmcs_small

OUT = Path(__file__).parents[1] / "docs" / "figures"

adata = pbmcs_small()
ref_cells = adata[adata.obs.donor.isin(["3pv2", "5p"])].copy()
query = adata[adata.obs.donor == "3pv1"].copy()
ref = sd.build_reference(
    ref_cells, batch_keys="donor", normalize=False, n_hvg=1000, hvg_batch_key="donor", n_pcs=20, n_clusters=100
)
query = sd.map_query(ref, query, batch_keys="donor", normalize=False)
sd.transfer_labels(ref, query, "cell_type", k=5)

OUT.mkdir(parents=True, exist_ok=True)
fig, axes = plt.subplots(1, 2, figsize=(13, 5), layout="constrained")
pl.reference(ref, color="cell_type", ax=axes[0])
pl.mapping(ref, query, color="cell_type_pred", ax=axes[1])
fig.savefig(OUT / "pbmc_reference_and_mapping.png", dpi=90)
fig, axes = plt.subplots(1, 2, figsize=(13, 5), layout="constrained")
pl.confusion(query.obs.cell_type, query.obs.cell_type_pred, ax=axes[0])
query.obs["mapping_score"] = sd.per_cell_mapping_metric(ref, query)
pl.mapping_scores(query, groupby="cell_type_pred", ax=axes[1])
fig.savefig(OUT / "pbmc_confusion_and_scores.png", dpi=90)
print(f"figures written to {OUT}")
