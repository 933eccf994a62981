"""`python -m mambakit` is the `mambakit` command (also under torchrun: `torchrun -m mambakit train`)."""

import sys

from mambakit.cli import main

sys.exit(main())
