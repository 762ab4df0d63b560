"""Synthetic data with a known truth: ``phantom`` (a brain-like DCE phantom, its files and its truth maps)."""
