"""Container health check: exit 0 when the server's /health answers 200, 1 otherwise.

Python rather than curl: the CUDA and slim base images don't all ship curl, and every image of
ours has Python. Reads the same VLMAMBA_* variables as the server, so a port changed through
VLMAMBA_PORT, or /health protected by --protect-health, is still checked correctly.
"""

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    port = os.environ.get("VLMAMBA_PORT") or "8000"
    request = urllib.request.Request(f"http://127.0.0.1:{port}/health")
    protected = os.environ.get("VLMAMBA_PROTECT_HEALTH", "").lower() in ("1", "true", "yes", "on")
    keys = [k.strip() for k in os.environ.get("VLMAMBA_API_KEY", "").split(",") if k.strip()]
    if protected and keys:
        request.add_header("Authorization", f"Bearer {keys[0]}")
    try:
        with urllib.request.urlopen(request, timeout=float(os.environ.get("HEALTHCHECK_TIMEOUT", "4"))) as r:
            return 0 if r.status == 200 else 1
    except (urllib.error.URLError, OSError) as e:  # HTTPError (503 while loading) is a URLError
        print(f"unhealthy: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
