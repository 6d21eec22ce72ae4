"""The HTTP API's share of file descriptors (issue 15 item 5; the load test is
tests/security/test_idle_connections.py)."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import resource
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, ({low}, hard))
from loracommons.coordinator.service import API_MAX_CONNECTIONS, ApiLimits
limits = ApiLimits.for_this_process()
now = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
assert now == hard, (now, hard)
assert limits.max_connections == max(8, min(API_MAX_CONNECTIONS, hard // 4)), limits
resource.setrlimit(resource.RLIMIT_NOFILE, (60, 60))
assert ApiLimits.for_this_process().max_connections == 15
print("ok")
"""


def test_soft_fd_limit_is_raised_and_the_api_takes_a_quarter_at_most():
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(low=64)], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr
