"""From counts to the PCA: normalization, gene moments, variable genes, the PCA and the CSR kernels of the passes.

Normalization is log CP10K or TF-IDF; variable genes are chosen by VST or mean.var.plot; the PCA is solved from
the Gram matrix or by block Krylov iterations.
"""
