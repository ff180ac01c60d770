"""Harmony's chunk groups on Dask workers (dask actors) and the lean channel between them."""
