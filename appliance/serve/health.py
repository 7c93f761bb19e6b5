"""`python -m appliance.serve.health URL [--timeout S]`: wait until vLLM's /health answers.

The unit's ExecStartPost: vLLM does not notify systemd when it is ready, so the
start counts as done when this exits 0. Standard library only (it runs inside
the sandboxed unit and must start fast).
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.error
import urllib.request


def wait(url: str, timeout: float, interval: float = 1.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=5) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(interval)
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args(argv)
    if wait(args.url, args.timeout):
        return 0
    print(f"{args.url}/health did not answer within {args.timeout:.0f} s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
