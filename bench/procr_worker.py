"""The procrastinate worker of the bench's procrastinate row (a module of its own, so that the App is
not created in __main__)."""

from __future__ import annotations

import sys

from bench.procr import worker_main

if __name__ == "__main__":
    if len(sys.argv) != 7:
        sys.exit(
            "usage: python -m bench.procr_worker DSN ENDPOINT ACCESS_KEY SECRET_KEY CONCURRENCY POLL_SECONDS"
        )
    worker_main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), float(sys.argv[6]))
