"""Neighbor search over the corrected embedding and the reference UMAP (fit and placement)."""
