"""Front ends on top of everything else (nothing in the Lib imports this folder): ``cli`` (the ``dcepk``
command), ``demo`` (``dcepk demo``), ``plugins`` (entry points through which the inference package adds
its commands and demo step).
"""
