"""Harmony's chunk groups on Dask workers (dask actors) and the lean channel between them.

``groups`` is how the driver reaches its groups (in this process or on a cluster) and rebuilds lost
ones; ``actor`` is a group on a worker, which leads a clustering iteration over its peers;
``channel`` carries a block between the leader and a peer; ``placement`` chooses each group's chunks
and worker; ``internals`` wraps the private ``distributed`` API that the calls to the actors use.
"""
