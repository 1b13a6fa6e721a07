"""`python -m runtime.remote agent` (the device's side of a session) and `python -m runtime.remote JOB SPEC`
(one job the agent runs)."""

import os
import sys

from runtime.remote.agent import agent
from runtime.remote.jobs import DEVICE_JOBS, job

if __name__ == "__main__":
    if sys.argv[1:2] == ["agent"]:
        code = agent()  # its answer is on its streams and in its exit code, its directory already removed
        sys.stdout.flush()
        sys.stderr.flush()
        # no interpreter teardown: a library's destructors aborted it there (SIGABRT after a clean refusal, 1 suite
        # run in 5), replacing the exit code the host reads
        os._exit(code)
    if len(sys.argv) == 3 and sys.argv[1] in DEVICE_JOBS:
        sys.exit(job(sys.argv[1], sys.argv[2]))
    print("usage: python -m runtime.remote agent   (run by the host through ssh; see python -m runtime bench --help)",
          file=sys.stderr)
    sys.exit(2)
