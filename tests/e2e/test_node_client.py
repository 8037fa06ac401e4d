"""The official openai Node SDK's WebSocket client (``ResponsesWS``) through the gateway.

Its packages come from ``tests/e2e/node/package.json`` (``npm ci --prefix tests/e2e/node``, which
``.ci/run`` does); without them, or without Node.js, the test skips with a message, unless
``WSGI_PROXY_REQUIRE_NODE=1`` (CI) makes that a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import CLIENT_KEY, Proxy

pytestmark = pytest.mark.e2e

NODE_DIR = Path(__file__).parent / "node"


def _node() -> str:
    node = shutil.which("node")
    missing = "Node.js is not installed" if node is None else None
    if missing is None and not (NODE_DIR / "node_modules" / "openai").is_dir():
        missing = "the Node SDK is not installed: npm ci --prefix tests/e2e/node"
    if missing is not None:
        if os.environ.get("WSGI_PROXY_REQUIRE_NODE") == "1":
            pytest.fail(f"{missing} (WSGI_PROXY_REQUIRE_NODE=1)")
        pytest.skip(missing)
    assert node is not None
    return node


def test_the_node_sdks_websocket_client_runs_two_chained_turns(proxy: Proxy) -> None:
    done = subprocess.run(
        [_node(), "turns.mjs", proxy.base_url, CLIENT_KEY],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    first, second = json.loads(done.stdout)
    assert first["types"][0] == "response.created" and first["last"] == "response.completed"
    assert second["last"] == "response.completed" and second["previous"] == first["id"]
