"""moto's S3 server, as `python -m moto.server`, without a log line for every request (which
would flood the benchmark's output and cost moto time of its own).

Run:  .venv/bin/python -m bench.quiet_moto -H 127.0.0.1 -p PORT
"""

from __future__ import annotations

import logging

from moto.server import main

if __name__ == "__main__":
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    main()
