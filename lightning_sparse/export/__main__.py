"""``python -m lightning_sparse.export --config CFG --ckpt_path X --out DIR --pattern 32x32``."""

from lightning_sparse.export.checkpoint import main

main()
