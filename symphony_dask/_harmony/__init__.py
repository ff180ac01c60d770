"""Harmony on chunks.

The public harmonize and its flavors, the driver loop, per-chunk state and steps, pure kernels, k-means and
the mixture (ridge) systems; ``cluster`` runs chunk groups on Dask workers.
"""
