"""``python -m lightning_sparse fit --config gmp``: the ``lightning-sparse`` command without the console script."""

from lightning_sparse.cli import console_main

console_main()
