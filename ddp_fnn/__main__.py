"""`python -m ddp_fnn ...` is `ddp-fnn ...` (torchrun launches workers this way: `torchrun ... -m ddp_fnn train`).

The worker process ends with os._exit once everything is written and flushed: by then
the process group is destroyed (ddp_fnn.dist.teardown), and skipping interpreter
finalisation leaves no window in which a Gloo thread still finishing a collective's
bookkeeping can need the GIL during Py_Finalize and abort the process (docs/shutdown.md).
Only here, the process entry point: cli.main and job.main return normally, so the
tests can call them in-process.
"""

import logging
import os
import sys

from ddp_fnn.cli import main

if __name__ == "__main__":
    try:
        main()
        status = 0
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(status)
