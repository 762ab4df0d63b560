"""Statistics of maps: ``stats`` (summaries, per-label statistics with the fit status, tables written safely)."""
