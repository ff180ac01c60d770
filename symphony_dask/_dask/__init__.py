"""Dask orchestration.

Kernels lifted over row chunks and tree reductions, guarded compute with worker-failure advice, BLAS thread
limits, cluster connection, the dashboard link and progress bars.
"""
