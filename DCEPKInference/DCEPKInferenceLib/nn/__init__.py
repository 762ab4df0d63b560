"""The networks: ``networks`` (the four architectures, mean and SD per parameter), ``model_store`` (shipped
weights and model cards, checksum-verified, ``list_models`` / ``load_model``)."""
