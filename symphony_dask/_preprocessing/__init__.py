"""From counts to the PCA: normalization (log CP10K, TF-IDF), gene moments, variable genes (VST,
mean.var.plot), the PCA (Gram and block Krylov) and the CSR kernels of the passes.
"""
