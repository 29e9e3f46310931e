"""The servers a bench run talks to: one it starts (its stderr kept, to say why it failed), one
it is pointed at, and the memory the server uses while the load runs."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

HEALTH = "/api/v1/health"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NotPulmoMedServer(Exception):
    """Something answered HTTP at the address, but not a PulmoMed Edge health report."""


async def get_health(base: str, timeout: float = 10.0) -> tuple[int, dict]:
    """GET the server's health report: (status code, body); NotPulmoMedServer when the body is not
    one."""
    import aiohttp

    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s,
        s.get(base + HEALTH) as r,
    ):
        try:
            body = await r.json()
        except (aiohttp.ContentTypeError, ValueError):
            body = None
        if not isinstance(body, dict) or "status" not in body:
            raise NotPulmoMedServer(f"HTTP {r.status}, {r.content_type}")
        return r.status, body


async def wait_healthy(base: str, server: ServerProcess | None, timeout: float = 300.0) -> dict:
    """The health report once the server has started; a clear exit when it cannot serve."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server is not None and server.exited:
            raise SystemExit(server.failure(f"the server bench started exited with code {server.returncode}"))
        try:
            status, body = await get_health(base)
        except NotPulmoMedServer as exc:
            raise SystemExit(f"{base} is not a PulmoMed Edge server (GET {HEALTH} answered {exc})") from None
        except TimeoutError:
            if server is None:
                raise SystemExit(f"{base} did not answer GET {HEALTH} within 10 s") from None
        except OSError:
            if server is None:
                raise SystemExit(
                    f"nothing is listening at {base} (start the server, or leave out --url)"
                ) from None
        else:
            if body.get("status") != "starting":
                if status != 200:
                    raise SystemExit(f"server is not healthy: {json.dumps(body, ensure_ascii=False)}")
                return body
        await asyncio.sleep(0.5)
    what = "the server did not become healthy in time"
    raise SystemExit(server.failure(what) if server is not None else what)


class ServerProcess:
    """A server this run started, its stderr kept in a temporary file to show why when it fails."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> None:
        self.name = name
        # append mode: the server's writes go to the end wherever tail() has moved the offset
        # (they share it), on Windows too (os.pread is POSIX-only)
        self._log = tempfile.TemporaryFile(mode="a+b")  # noqa: SIM115 - lives as long as the server; closed in stop()
        self._proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=self._log)
        print(f"bench: started {name} (pid {self.pid})", file=sys.stderr, flush=True)

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def exited(self) -> bool:
        return self._proc.poll() is not None

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    def tail(self, lines: int = 15) -> str:
        """The last lines it wrote to stderr."""
        size = os.fstat(self._log.fileno()).st_size
        self._log.seek(max(0, size - 16384))
        text = self._log.read().decode("utf-8", "replace")
        return "\n".join(text.splitlines()[-lines:])

    def failure(self, what: str) -> str:
        """`what`, followed by the server's last stderr lines when it wrote any."""
        tail = self.tail()
        return f"{what}; its last lines:\n{tail}" if tail else what

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._log.close()


def spawn_server(args: argparse.Namespace, port: int) -> ServerProcess:
    env = dict(os.environ)
    if args.budget:
        env["PULMOMED_BUDGET_S"] = str(args.budget)
    env.update(
        PULMOMED_MAX_NEW_TOKENS=str(args.max_tokens),
        PULMOMED_SLOTS=str(args.slots),
        PULMOMED_RATE_LIMIT_PER_MIN=os.environ.get("PULMOMED_RATE_LIMIT_PER_MIN", "10"),
    )
    # a frozen bundle's executable is the CLI itself; from source, run the package
    program = [sys.executable] if getattr(sys, "frozen", False) else [sys.executable, "-m", "pulmomed_edge"]
    cmd = [*program, "serve", "--host", "127.0.0.1", "--port", str(port)]
    if args.model:
        cmd += ["--model", args.model]
    if args.test_models:
        cmd.append("--test-models")
    return ServerProcess(f"a server at http://127.0.0.1:{port}", cmd, env)


class RssSampler:
    """Peak resident memory of a process, sampled while the load runs."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.peak = 0
        self._task: asyncio.Task[None] | None = None

    async def _loop(self) -> None:
        import psutil

        proc = psutil.Process(self.pid)
        while True:
            self.peak = max(self.peak, proc.memory_info().rss)
            await asyncio.sleep(0.25)

    def start(self) -> None:
        if self.pid:
            self._task = asyncio.create_task(self._loop())

    async def stop(self) -> float | None:
        """The peak in MB (None when nothing was sampled), as the reports give it."""
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        return round(self.peak / 2**20, 1) if self.peak else None
