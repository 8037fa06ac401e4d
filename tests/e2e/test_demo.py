"""The README's first quick-start command keeps working: `wsgi-proxy demo` plays and passes."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


def test_demo_plays_the_resume_scenario_and_passes() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "wsgi_proxy", "demo", "--cut-after", "6"],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "connection dropped after sequence_number 6" in out
    assert "starting_after=6" in out
    assert "none missing, none repeated" in out
    assert "equals the text of response.completed" in out
    assert "two turns on one connection, the second chained to the first: yes" in out
    assert "Traceback" not in out + done.stderr
