"""Files and batches through the gateway: uploads and downloads streamed (a 200 MB file leaves the
worker's RSS flat), every object owned by the team that made it, lists showing only the team's own,
and a body naming another team's file refused wherever it is named."""

from __future__ import annotations

import hashlib
import os
import threading
import time
import typing as t
from pathlib import Path

import openai
import pytest
import requests
from openai import OpenAI

from wsgi_proxy.simulator import Simulator, SimulatorConfig

from .conftest import UPSTREAM_KEY, Proxy, start_red_and_blue

pytestmark = pytest.mark.e2e

KEYS = {"RED_KEY": "sk-red-files-team-key1", "BLUE_KEY": "sk-blue-files-team-key"}
UPLOAD_MB = 200


@pytest.fixture(scope="module")
def simulator() -> t.Iterator[Simulator]:
    sim = Simulator(config=SimulatorConfig(api_key=UPSTREAM_KEY)).start()
    yield sim
    sim.stop()


@pytest.fixture(scope="module")
def gateway(simulator: Simulator, tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[Proxy]:
    env = {
        "WSGI_PROXY_ENDPOINTS": "files,batches,embeddings,chat/completions",
        "WSGI_PROXY_MAX_UPLOAD_BYTES": str((UPLOAD_MB + 1) * 1024 * 1024),
        "WSGI_PROXY_WORKERS": "1",
    }
    proxy, _ = start_red_and_blue(tmp_path_factory.mktemp("files"), simulator.base_url, KEYS, env=env)
    yield proxy
    proxy.server.stop()


def _sdk(proxy: Proxy, key: str) -> OpenAI:
    return OpenAI(base_url=proxy.base_url, api_key=KEYS[key], max_retries=0, timeout=120)


def _worker_rss_kb(proxy: Proxy) -> int:
    (child,) = Path(f"/proc/{proxy.server.pid}/task/{proxy.server.pid}/children").read_text().split()
    for line in Path(f"/proc/{child}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


class _Peak:
    """The worker's highest RSS while a block runs, sampled every 20 ms."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.before = _worker_rss_kb(proxy)
        self.peak = self.before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _worker_rss_kb(self.proxy))

    def __enter__(self) -> _Peak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_a_200_mb_upload_and_download_leave_the_workers_memory_flat(gateway: Proxy, tmp_path: Path) -> None:
    source = tmp_path / "big.jsonl"
    digest = hashlib.sha256()
    with source.open("wb") as out:
        for _ in range(UPLOAD_MB):
            block = os.urandom(1024 * 1024)
            digest.update(block)
            out.write(block)
    with _sdk(gateway, "RED_KEY") as red:
        red.embeddings.create(model="text-embedding-3-small", input="warm the worker up")
        with _Peak(gateway) as upload, source.open("rb") as handle:
            uploaded = red.files.create(file=handle, purpose="batch")
        received = hashlib.sha256()
        with _Peak(gateway) as download, red.files.with_streaming_response.content(uploaded.id) as answer:
            for block in answer.iter_bytes(1024 * 1024):
                received.update(block)
    assert uploaded.bytes == UPLOAD_MB * 1024 * 1024
    assert received.hexdigest() == digest.hexdigest()
    for peak in (upload, download):
        assert peak.peak - peak.before < 20 * 1024, (peak.before, peak.peak)  # KB: under 20 MB for 200 MB


def test_files_are_their_teams_own(gateway: Proxy, simulator: Simulator) -> None:
    with _sdk(gateway, "RED_KEY") as red:
        mine = red.files.create(file=("red.jsonl", b'{"x": 1}\n'), purpose="batch")
        assert red.files.retrieve(mine.id).filename == "red.jsonl"
    with _sdk(gateway, "BLUE_KEY") as blue:
        theirs = blue.files.create(file=("blue.jsonl", b'{"y": 2}\n'), purpose="batch")
        before = len(simulator.requests)
        for call in (
            lambda: blue.files.retrieve(mine.id),
            lambda: blue.files.content(mine.id),
            lambda: blue.files.delete(mine.id),
        ):
            with pytest.raises(openai.NotFoundError):
                call()
        assert len(simulator.requests) == before  # refused before the upstream
        listed = [f.id for f in blue.files.list().data]
    assert theirs.id in listed and mine.id not in listed
    with _sdk(gateway, "RED_KEY") as red:
        assert red.files.content(mine.id).read() == b'{"x": 1}\n'
        assert red.files.delete(mine.id).deleted is True
        with pytest.raises(openai.NotFoundError):
            red.files.retrieve(mine.id)  # forgotten with its deletion


def test_an_upload_is_bounded_and_must_announce_its_length(gateway: Proxy, simulator: Simulator) -> None:
    headers = {
        "Authorization": f"Bearer {KEYS['RED_KEY']}",
        "Content-Type": "multipart/form-data; boundary=x",
    }
    before = len(simulator.requests)
    chunked = requests.post(gateway.base_url + "/files", data=iter([b"--x\r\n"]), headers=headers, timeout=30)
    too_large = requests.post(
        gateway.base_url + "/files",
        headers={**headers, "Content-Length": str((UPLOAD_MB + 2) * 1024 * 1024)},
        data=b"",
        timeout=30,
    )
    assert (chunked.status_code, chunked.json()["error"]["code"]) == (411, "length_required")
    assert too_large.status_code == 413
    assert len(simulator.requests) == before


def test_files_are_off_unless_the_operator_serves_them(proxy: Proxy) -> None:
    started = time.monotonic()
    with proxy.client() as client, pytest.raises(openai.NotFoundError) as caught:
        client.files.list()
    assert "WSGI_PROXY_ENDPOINTS" in caught.value.message and time.monotonic() - started < 10


def test_batches_are_their_teams_own_and_name_only_the_teams_files(
    gateway: Proxy, simulator: Simulator
) -> None:
    with _sdk(gateway, "RED_KEY") as red:
        red_file = red.files.create(file=("in.jsonl", b'{"custom_id": "1"}\n'), purpose="batch")
        red_batch = red.batches.create(
            input_file_id=red_file.id, endpoint="/v1/responses", completion_window="24h"
        )
        assert red.batches.retrieve(red_batch.id).input_file_id == red_file.id
    with _sdk(gateway, "BLUE_KEY") as blue:
        blue_file = blue.files.create(file=("in.jsonl", b'{"custom_id": "2"}\n'), purpose="batch")
        blue_batch = blue.batches.create(
            input_file_id=blue_file.id, endpoint="/v1/responses", completion_window="24h"
        )
        before = len(simulator.requests)
        for call in (
            lambda: blue.batches.retrieve(red_batch.id),
            lambda: blue.batches.cancel(red_batch.id),
            lambda: blue.batches.create(
                input_file_id=red_file.id, endpoint="/v1/responses", completion_window="24h"
            ),
            lambda: blue.responses.create(
                model="gpt-4o-mini",
                input=[{"role": "user", "content": [{"type": "input_file", "file_id": red_file.id}]}],
            ),
        ):
            with pytest.raises(openai.NotFoundError):
                call()
        assert len(simulator.requests) == before  # all refused before the upstream
        listed = [b.id for b in blue.batches.list().data]
        assert blue.batches.cancel(blue_batch.id).status == "cancelled"
    assert blue_batch.id in listed and red_batch.id not in listed


def test_a_batchs_output_file_is_its_teams_own(gateway: Proxy) -> None:
    with _sdk(gateway, "RED_KEY") as red:
        source = red.files.create(
            file=("in.jsonl", b'{"custom_id": "a"}\n{"custom_id": "b"}\n'), purpose="batch"
        )
        batch = red.batches.create(
            input_file_id=source.id,
            endpoint="/v1/responses",
            completion_window="24h",
            metadata={"sim_complete": "1"},
        )
        done = red.batches.retrieve(batch.id)  # names the output file the upstream made
        assert done.status == "completed" and done.output_file_id is not None
        output = red.files.content(done.output_file_id).read()
    assert output.count(b"\n") == 2
    with _sdk(gateway, "BLUE_KEY") as blue, pytest.raises(openai.NotFoundError):
        blue.files.content(done.output_file_id)


def test_another_teams_file_named_in_a_conversation_or_a_chat_message_is_refused(
    gateway: Proxy, simulator: Simulator
) -> None:
    with _sdk(gateway, "RED_KEY") as red:
        red_file = red.files.create(file=("notes.txt", b"red's notes"), purpose="user_data")
        item: t.Any = {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_file", "file_id": red_file.id}],
        }
        part: t.Any = {"type": "file", "file": {"file_id": red_file.id}}
        # The owner may.
        assert red.conversations.create(items=[item]).id
        assert red.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": [part]}]
        )
    with _sdk(gateway, "BLUE_KEY") as blue:
        own = blue.conversations.create()
        before = len(simulator.requests)
        for call in (
            lambda: blue.conversations.create(items=[item]),
            lambda: blue.conversations.items.create(own.id, items=[item]),
            lambda: blue.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": [part]}]
            ),
        ):
            with pytest.raises(openai.NotFoundError):
                call()
        assert len(simulator.requests) == before
