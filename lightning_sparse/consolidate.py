"""``python -m lightning_sparse.consolidate DIR [OUT]``: an FSDP2 (distributed) checkpoint folder as one file that
resumes on one device, masks included (see :func:`lightning_sparse.mask_checkpoint.consolidate`).

Example:

.. code-block:: bash

    python -m lightning_sparse.consolidate runs/fsdp2/checkpoints/epoch=0.ckpt   # writes epoch=0.ckpt.consolidated
"""

from __future__ import annotations

import argparse

from lightning_sparse.mask_checkpoint import consolidate


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lightning_sparse.consolidate", description=__doc__.split("\n")[0])
    parser.add_argument("folder", help="a distributed checkpoint folder written by ModelParallelStrategy")
    parser.add_argument("out", nargs="?", default=None, help="the file to write (default: FOLDER.consolidated)")
    args = parser.parse_args(argv)
    try:
        out = consolidate(args.folder, args.out)
    except ValueError as error:
        parser.error(str(error))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
