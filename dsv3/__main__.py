"""`python -m dsv3 ...`: the `dsv3` command, as torchrun starts it (`torchrun ... -m dsv3 train`)."""

import sys

from dsv3.cli import main

sys.exit(main())
