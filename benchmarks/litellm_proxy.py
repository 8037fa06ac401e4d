"""LiteLLM's proxy, to compare with: found, configured in front of a simulator, and started.

LiteLLM is not a dependency of this project. Install it in a venv of its own (its proxy pins
versions of packages that this project's environment should not take) and name its command in
``WSGI_PROXY_BENCH_LITELLM``, or install it beside this project. ``run.py`` measures it side by side
with direct calls and wsgi-proxy, and ``ramp.py`` opens streams through it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

from wsgi_proxy.tools.launch import ServerProcess, free_port

#: The ``litellm`` command to compare with, when it lives outside this environment.
LITELLM_ENV = "WSGI_PROXY_BENCH_LITELLM"
LITELLM_KEY = "sk-bench-litellm"
LITELLM_CONFIG = """\
model_list:
  - model_name: gpt-4o-mini
    litellm_params:
      model: openai/gpt-4o-mini
      api_base: "{direct}"
      api_key: "{upstream_key}"
general_settings:
  master_key: "{master_key}"
"""


def command() -> tuple[list[str] | None, str]:
    """The ``litellm`` command and its version, or None and the reason it cannot run."""
    explicit = os.environ.get(LITELLM_ENV, "").strip()
    if explicit:
        executable = shutil.which(explicit)
        if executable is None:
            return None, f"litellm: {LITELLM_ENV}={explicit!r} is not a command; not measured"
        return [executable], _version_beside(Path(executable)) or "unknown version"
    try:
        version: str | None = importlib.metadata.version("litellm")
    except importlib.metadata.PackageNotFoundError:
        version = None
    if version is None and importlib.util.find_spec("litellm") is None:
        return None, f"litellm: not installed (nor named by {LITELLM_ENV}), not measured"
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    executable = shutil.which("litellm", path=search)
    if executable is None:
        return None, f"litellm {version}: importable, but no `litellm` command on PATH; not measured"
    return [executable], version or "unknown version"


def _version_beside(executable: Path) -> str | None:
    """LiteLLM's version, asked of the Python interpreter next to its command."""
    code = "import importlib.metadata as m; print(m.version('litellm'))"
    try:
        done = subprocess.run(
            [str(executable.resolve().parent / "python"), "-c", code],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def start(litellm: list[str], tmp: Path, direct: str, upstream_key: str) -> tuple[ServerProcess, str]:
    """LiteLLM's proxy (``litellm``: its command), one worker, in front of the simulator at
    ``direct`` (its ``/v1`` URL); returns the running server and its ``/v1`` URL, or raises with
    its log when it does not start."""
    port = free_port()
    config = tmp / "litellm.yaml"
    config.write_text(LITELLM_CONFIG.format(direct=direct, upstream_key=upstream_key, master_key=LITELLM_KEY))
    server = ServerProcess(
        [*litellm, "--config", str(config), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"],
        ready_url=f"http://127.0.0.1:{port}/health/liveliness",
        env={"LITELLM_LOG": "ERROR", "LITELLM_LOCAL_MODEL_COST_MAP": "True", "NO_PROXY": "127.0.0.1"},
        cwd=tmp,
        log_path=tmp / "litellm.log",
    )
    try:
        server.start(timeout=180)
    except BaseException:
        server.stop()
        raise
    return server, f"http://127.0.0.1:{port}/v1"
