"""``python -m fastquant.cli`` runs the ``fastquant`` command, for launchers that take a module
(``torchrun --nproc_per_node N -m fastquant.cli distill ...``); the command line is :mod:`fastquant.app.cli`."""

import sys

from fastquant.app.cli import main

if __name__ == "__main__":
    sys.exit(main())
