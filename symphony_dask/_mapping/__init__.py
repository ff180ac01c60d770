"""Mapping queries onto a reference, transferring annotations, and mapping-quality metrics."""
