"""The networks' data: ``canonical_grid`` (any protocol -> concentration on a fixed grid, validity mask and
protocol features), ``simulator`` (training data from the fitting core's physics)."""
