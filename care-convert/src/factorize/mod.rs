//! Low-rank factorizations of projection weights (CARE and baselines).
