"""Metrics of estimated maps against the truth: ``metrics`` (RMSE, bias, CCC, coverage, Spearman)."""
