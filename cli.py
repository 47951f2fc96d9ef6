"""Run the lightning_sparse CLI from a checkout: ``python cli.py fit --config configs/gmp.yaml``."""

from lightning_sparse.cli import main

if __name__ == "__main__":
    main()
