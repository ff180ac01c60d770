"""The Symphony reference.

The model, its store (save, load, checksums), the build as stage functions, compression, and references made
elsewhere (R's .rds, scanpy's layout).
"""
