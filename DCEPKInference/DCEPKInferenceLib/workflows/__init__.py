"""Front ends (nothing in the Lib imports this folder): ``infer_command`` (``dcepk infer``),
``train_command`` (``dcepk train``), ``plugin`` (the entry points the fitting package's CLI and demo find)."""
