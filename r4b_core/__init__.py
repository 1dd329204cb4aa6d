"""r4b: the R-4B recipe (bi-mode annealing + Bi-mode Policy Optimization) as a library.

Stages are plain functions, `run_<stage>(cfg, ...)`, importable without Kubernetes or KFP:

    from r4b_core import config, modes
    from r4b_core.anneal import run_anneal
"""

__version__ = "0.1.0"
