"""Helpers of the serving tests: a server subprocess on a free loopback port, a small HTTP client.

Every wait is bounded (a deadline); every process a test starts is stopped in a finally.
"""
from __future__ import annotations

import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Optional, Set

import numpy as np

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def request(port: int, method: str, path: str, body: Optional[bytes] = None, headers: Optional[dict] = None,
            timeout: float = 60.0):
    """-> (status, headers dict (lower-case names), body bytes)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def post_generate(port: int, payload, accept: Optional[str] = None, timeout: float = 60.0):
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    headers = {"Content-Type": "application/json"}
    if accept:
        headers["Accept"] = accept
    return request(port, "POST", "/v1/generate", body, headers, timeout)


def png_array(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


class Server:
    """``python -m detailflow_engine.serve ARGS`` on a free port; stop() always ends it (and its children)."""

    def __init__(self, *args: str, env: Optional[Dict[str, str]] = None, drop_env=(), ready_s: float = 120.0):
        self.port = free_port()
        self.log = tempfile.TemporaryFile()  # a file, not a pipe: a chatty server never blocks on it
        e = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        for name in drop_env:
            e.pop(name, None)
        self.proc = subprocess.Popen([sys.executable, "-m", "detailflow_engine.serve", "--host", HOST,
                                      "--port", str(self.port), *args], cwd=REPO, env=e,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.seen: Set[int] = set()  # every descendant process seen while it ran
        self._ready(ready_s)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-4000:]

    def _ready(self, limit_s: float) -> None:
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode} before it was ready:\n"
                                   f"{self.output()}")
            try:
                status, _, _ = request(self.port, "GET", "/healthz", timeout=5)
                if status == 200:
                    self.seen |= descendants(self.proc.pid)
                    return
            except OSError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"the server was not ready within {limit_s:g} s")

    def signal(self, sig=signal.SIGINT) -> None:
        self.seen |= descendants(self.proc.pid)
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> Optional[int]:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        """End the server and whatever it started (its process group and every descendant seen)."""
        if self.proc.poll() is None:
            self.seen |= descendants(self.proc.pid)
            self.proc.send_signal(signal.SIGINT)
            if self.wait(20) is None:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.wait(10)
        for pid in alive(self.seen):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        self.stop()
        self.log.close()


def _children_map() -> Dict[int, list]:
    kids: Dict[int, list] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def descendants(pid: int) -> Set[int]:
    kids, out, todo = _children_map(), set(), [pid]
    while todo:
        p = todo.pop()
        for c in kids.get(p, []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def alive(pids) -> Set[int]:
    """The pids that still run (zombies count as gone)."""
    out = set()
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.add(p)
    return out


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
