"""Drain this ComfyUI's backend in comfyfleet and wait until nothing runs there.

Run by a ComfyUI pod's preStop hook (deploy/kubernetes/base/comfyui.yaml) before the pod
stops, so scaling GPUs down loses no work: comfyfleet sends the backend nothing new, and this
returns once every prompt it had there has finished (or after --wait seconds). Standard
library only, as it runs with the ComfyUI image's Python; ComfyUI never imports it.

    python3 drain.py [--wait SECONDS] [--name NAME]

COMFYFLEET_URL is comfyfleet's API (e.g. http://comfyfleet:8000/api/v1); COMFYFLEET_ADMIN_KEY
an admin API key (unset when comfyfleet has no keys). The name defaults to HOSTNAME, the
pod's name, which is the backend's name when comfyfleet discovered it through DNS.
Exit status: 0 idle, 1 still busy when the wait ran out, 2 comfyfleet refused or failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request


def drain(base: str, name: str, wait: float, key: str | None) -> int:
    url = f"{base.rstrip('/')}/backends/{urllib.parse.quote(name, safe='')}/drain"
    headers = {"content-type": "application/json"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    request = urllib.request.Request(
        url, data=json.dumps({"wait": wait}).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=wait + 30) as response:
            body = json.load(response)
            idle = response.status == 200
    except urllib.error.HTTPError as error:
        print(f"comfyfleet answered {error.code}: {error.read()[:500]!r}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"comfyfleet unreachable at {url}: {error}", file=sys.stderr)
        return 2
    print(f"backend {name}: {'idle' if idle else 'still busy'}: {json.dumps(body)}")
    return 0 if idle else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wait", type=float, default=300.0,
                        help="seconds to wait for the backend to go idle (default 300)")
    parser.add_argument("--name", default=os.environ.get("HOSTNAME", ""),
                        help="the backend's name in comfyfleet (default: HOSTNAME)")
    args = parser.parse_args()
    base = os.environ.get("COMFYFLEET_URL")
    if not base or not args.name:
        parser.error("set COMFYFLEET_URL, and --name or HOSTNAME")
    return drain(base, args.name, args.wait, os.environ.get("COMFYFLEET_ADMIN_KEY"))


if __name__ == "__main__":
    sys.exit(main())
