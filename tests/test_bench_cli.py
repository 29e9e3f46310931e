"""`pulmomed-edge bench` as a lab admin meets it: flags refused up front, servers that fail or
stop named, no server left behind, a table that reads right."""

from __future__ import annotations

import http.server
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest
from conftest import cli_env

from pulmomed_edge.bench import TABLE_ROWS, Outcome, print_table, source_address, summarize
from pulmomed_edge.bench_args import BenchUsageError, check_url

BENCH = [sys.executable, "-m", "pulmomed_edge", "bench", "--test-models"]
NOWHERE = "http://127.0.0.1:9"  # never reached: the flags are refused first


def _free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _run(settings, tmp_path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*BENCH, *args],
        env={**cli_env(settings, tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


class Bench:
    """A bench run in its own process whose stderr lines the test can wait for."""

    def __init__(self, settings, tmp_path: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [*BENCH, *args],
            env=cli_env(settings, tmp_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self._stdout: list[str] = []
        # each pipe has one reader: communicate() would read (and close) stderr under the line
        # reader's feet, which then failed in its thread ("I/O operation on closed file")
        self._readers = [
            threading.Thread(target=self._read, daemon=True),
            threading.Thread(target=lambda: self._stdout.append(self.proc.stdout.read()), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.put(line)
        self.lines.put("")

    def wait_for(self, text: str, timeout: float = 240.0) -> str:
        while True:
            line = self.lines.get(timeout=timeout)
            self.seen.append(line)
            assert line, f"bench ended before {text!r}: {''.join(self.seen)[-2000:]}"
            if text in line:
                return line

    def server_pid(self) -> int:
        line = self.wait_for("bench: started a server")
        return int(line.rsplit("(pid ", 1)[1].rstrip(")\n"))

    def finish(self, timeout: float = 120.0) -> tuple[int, str]:
        self.proc.wait(timeout=timeout)
        for reader in self._readers:
            reader.join(timeout)
        return self.proc.returncode, "".join(self._stdout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--requests", "0"], "--requests must be at least 1"),
        (["--headsets", "0"], "--headsets must be at least 1"),
        (["--headsets", "-3"], "--headsets must be at least 1"),
        (["--invariance", "--headsets", "0"], "--headsets must be at least 1"),
        (["--max-tokens", "0"], "--max-tokens must be at least 1"),
        (["--duration", "-1"], "--duration must be 0 or more"),
        (["--think", "-5"], "--think must be 0 or more"),
        (["--mix", "libre:0,biblioteca:0"], "--mix needs at least one weight above 0"),
        (["--mix", "libre"], "--mix takes kind:weight pairs"),
        (["--mix", "biblioteca:-5,libre:1"], "--mix weights are numbers of 0 or more"),
        (["--mix", "foo:1"], "--mix takes kind:weight pairs"),
        (["--repeat-after", "1", "--duration", "5"], "--repeat-after does not go with --duration"),
        (["--url", NOWHERE, "--spawn"], "--url and --spawn: choose one"),
        (["--url", NOWHERE, "--max-tokens", "16"], "the server's own settings apply"),
        (
            ["--url", NOWHERE, "--slots", "2", "--budget", "5"],
            "--slots/--budget would be ignored",
        ),
        (["--url", NOWHERE, "--runs", "2"], "--runs needs a server of bench's own"),
        (["--url", "127.0.0.1:9"], "--url takes http://HOST:PORT"),
        (["--url", "http://192.0.2.1:9"], "only targets loopback"),
    ],
)
def test_bad_flag_values_are_refused_before_any_server_starts(settings, tmp_path, args, says):
    proc = _run(settings, tmp_path, *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("pulmomed-edge bench: error: ") and says in proc.stderr
    assert len(proc.stderr.splitlines()) == 1  # one line, no traceback, no server started


@pytest.mark.parametrize("flag", ["--json", "--save-answers"])
def test_an_unwritable_report_path_is_refused_before_the_run(settings, tmp_path, flag):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    proc = _run(settings, tmp_path, "--spawn", flag, str(blocker / "out.json"))
    assert proc.returncode == 2 and f"{flag} {blocker / 'out.json'}: cannot write there" in proc.stderr
    assert "started" not in proc.stderr


def test_a_writable_report_path_is_left_as_it_was_when_the_run_is_refused(settings, tmp_path):
    out = tmp_path / "new" / "report.json"
    proc = _run(settings, tmp_path, "--requests", "0", "--json", str(out))
    assert proc.returncode == 2 and not out.exists()


def test_url_takes_http_on_ipv4_or_ipv6_loopback():
    assert check_url("http://127.0.0.1:8000/") == "http://127.0.0.1:8000"
    assert check_url("http://[::1]:8000") == "http://[::1]:8000"
    assert check_url("http://localhost:8000") == "http://localhost:8000"
    for refused in ("127.0.0.1:8000", "https://127.0.0.1:8000", "http://[::1]:port", "http://192.0.2.1:80"):
        with pytest.raises(BenchUsageError):
            check_url(refused)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_url_with_nothing_listening_fails_at_once(settings, tmp_path, host):
    url = f"http://{'[::1]' if host == '::1' else host}:{_free_port(host)}"
    proc = _run(settings, tmp_path, "--url", url)
    assert proc.returncode == 1 and f"nothing is listening at {url}" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_url_at_a_server_that_is_not_pulmomed_says_so(settings, tmp_path, host):
    class Server(http.server.ThreadingHTTPServer):
        address_family = socket.AF_INET6 if host == "::1" else socket.AF_INET

    quiet = type("Quiet", (http.server.SimpleHTTPRequestHandler,), {"log_message": lambda *a: None})
    other = Server((host, 0), quiet)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        url = f"http://{'[::1]' if host == '::1' else host}:{other.server_address[1]}"
        proc = _run(settings, tmp_path, "--url", url)
    finally:
        other.shutdown()
        other.server_close()
    assert proc.returncode == 1 and f"{url} is not a PulmoMed Edge server" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_spawned_server_that_cannot_start_shows_its_own_error(settings, tmp_path):
    proc = _run(settings, tmp_path, "--spawn", "--headsets", "1", "--requests", "1", PULMOMED_THREADS="many")
    assert proc.returncode == 1
    assert "the server bench started exited with code 1; its last lines:" in proc.stderr
    assert "many" in proc.stderr  # the server's own complaint about the setting


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_that_ends_the_bench_stops_its_server(settings, tmp_path, sig):
    bench = Bench(settings, tmp_path, "--spawn", "--headsets", "1", "--duration", "600", "--think", "1")
    try:
        pid = bench.server_pid()
        bench.wait_for("headsets asking")
        bench.proc.send_signal(sig)
        code, _ = bench.finish()
    finally:
        bench.kill()
    assert code == 128 + sig
    left = psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    if left:
        os.kill(pid, signal.SIGKILL)
    assert not left


def test_a_server_that_dies_mid_run_still_gets_its_report(settings, tmp_path):
    out = tmp_path / "report.json"
    args = ("--spawn", "--headsets", "2", "--duration", "600", "--think", "0.5", "--max-tokens", "16")
    bench = Bench(settings, tmp_path, *args, "--json", str(out))
    try:
        pid = bench.server_pid()
        bench.wait_for("headsets asking")
        os.kill(pid, signal.SIGKILL)
        code, stdout = bench.finish()
    finally:
        bench.kill()
    assert code == 1
    ours = json.loads(out.read_text(encoding="utf-8"))["pulmomed"]
    assert "stopped answering" in ours["server_stopped"] and ours["server_exit_code"] == -signal.SIGKILL
    assert ours["errors"] >= 1 and ours["requests"] == ours["ok"] + ours["errors"]
    assert "stopped answering" in stdout and "errors" in stdout


def test_every_headset_has_its_own_source_address():
    addresses = [source_address(i) for i in range(3000)]
    assert len(set(addresses)) == len(addresses)
    assert addresses[0] == "127.0.0.2" and "127.0.0.1" not in addresses
    assert not any(a.endswith((".0", ".255")) for a in addresses)


def test_table_columns_line_up_and_failed_references_say_why(capsys):
    answer = {"explicacion": "Bien.", "recomendacion": "Sigue.", "llm_model": "m"}
    ok = Outcome(0, 200, 1.5, 1.5, "m", "miss", False, state={}, answer=answer)
    lost = Outcome(1, 0, 0.1, None, error="ServerDisconnectedError: gone")
    ours = summarize([ok, lost], 2.0, 20, 1)
    ours["busy"] = {"late": 0, "short": 1, "crowds": 0, "queue": 2}
    report = {
        "args": {"stream": False},
        "pulmomed": ours,
        "baseline": {"error": "llama_cpp.server exited with code 1"},
        "ceiling": {"error": "prefill failed"},
    }
    print_table(report)
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if line.startswith(tuple(label for label, _ in TABLE_ROWS))]
    assert len(rows) == len(TABLE_ROWS) and len({len(row) for row in rows}) == 1
    assert next(r for r in rows if r.startswith("busy")).split()[-2] == "0/1/0/2"
    # without --stream an answer comes whole: no TTFT is claimed for it
    assert all(r.split()[-2] == "n/a" for r in rows if r.startswith("TTFT"))
    assert "baseline failed: llama_cpp.server exited with code 1" in lines
    assert "ceiling failed: prefill failed" in lines
