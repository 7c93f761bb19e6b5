"""`python -m appliance.serve.health URL [--timeout S] [--pid PID]`: wait until vLLM's /health answers.

The unit's ExecStartPost: vLLM does not notify systemd when it is ready, so the
start counts as done when this exits 0. It gives up at once when the server
process (--pid, else $MAINPID, which systemd sets for ExecStartPost) is gone:
otherwise a vLLM that died while starting would hold the unit in start-post
until the timeout, and systemd would restart nothing for that long.
Standard library only (it runs inside the sandboxed unit and must start fast).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import urllib.error
import urllib.request


def alive(pid: int | None) -> bool:
    if pid is None:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, though not ours to signal
    return True


def wait(url: str, timeout: float, interval: float = 1.0, pid: int | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive(pid):
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
    parser.add_argument("--pid", type=int, default=int(os.environ["MAINPID"]) if os.environ.get("MAINPID", "").isdigit() else None)
    args = parser.parse_args(argv)
    if wait(args.url, args.timeout, pid=args.pid):
        return 0
    if not alive(args.pid):
        print(f"the server (pid {args.pid}) exited before {args.url}/health answered", file=sys.stderr)
    else:
        print(f"{args.url}/health did not answer within {args.timeout:.0f} s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
