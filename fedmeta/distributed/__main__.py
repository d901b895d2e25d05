"""`torchrun --nproc-per-node P -m fedmeta.distributed ...` (see `fedmeta.distributed.command`)."""

import os
import sys
import traceback

from .command import main

try:
    code = main()
except Exception:  # noqa: BLE001 -- every failure: report it, then leave at once
    # The rank has said what failed and torchrun has its error file: skip the interpreter's slow
    # teardown, during which torchrun's SIGTERM (sent to every rank once one fails) would end the
    # process by signal and hide exit status 1.
    traceback.print_exc()
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(1)
sys.exit(code)
