"""`python -m dsv3 ...`: the `dsv3` command, as torchrun starts it (`torchrun ... -m dsv3 train`)."""

import atexit
import os
import sys

from dsv3.cli import main

code = main()
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    # A rank of a job has written and closed everything by now, once the exit hooks have run (a serving leader
    # releases its followers there). Skip the interpreter's teardown: torch's process-group threads can
    # outlive it and abort the process (exit code -6) after a successful run.
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
