"""A server as its users run it: `python -m mistral_jax.serve` in a subprocess on a free loopback
port, polled until /health answers; helpers to find and wait on its processes (Linux /proc)."""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

MODEL = "tiny"
SETTINGS = ["--dtype", "float32", "--max-model-len", "256", "--num-pages", "400", "--max-num-seqs", "32",
            "--max-num-batched-tokens", "128"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model_dir, *extra, env=None, api_key=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        env = dict(env or {}, **({"MISTRAL_JAX_API_KEY": api_key} if api_key else {}))
        cmd = [sys.executable, "-m", "mistral_jax.serve", "--model", str(model_dir), "--served-model-name", MODEL,
               "--port", str(self.port), *SETTINGS, *extra]
        self.log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a full pipe would block the server
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, text=True,
                                     env=dict(os.environ, JAX_PLATFORMS="cpu", **(env or {})))
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"the server exited: {self.log.read()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    self.log.seek(0, 2)
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError("the server did not start in 180 s")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        return self.proc.returncode

    def output(self) -> str:
        self.log.seek(0)
        text = self.log.read()
        self.log.seek(0, 2)
        return text

    def engine_pid(self) -> int:
        (pid,) = children(self.proc.pid, comm="mj-engine")
        return pid

    def metric(self, name: str, labels: str = "") -> float:
        text = httpx.get(self.url + "/metrics", headers=self.headers).text
        prefix = f"mistral_jax:{name}{{{labels}}} " if labels else f"mistral_jax:{name} "
        line = next((ln for ln in text.splitlines() if ln.startswith(prefix)), None)
        if line is None and labels:
            return 0.0  # a labelled series appears with its first count
        return float(line.split()[-1])


def children(pid: int, running: str = "", comm: str | None = None) -> list[int]:
    """A process's child processes whose command line holds `running` and, if given, whose name
    (/proc/PID/comm: the server names its processes mj-engine, mj-http-N, mj-tokenizer) is comm."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    out = [c for c in out if running in Path(f"/proc/{c}/cmdline").read_text().replace("\0", " ")]
    return [c for c in out if comm is None or Path(f"/proc/{c}/comm").read_text().strip() == comm]


def wait_gone(pid: int, seconds: float) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True  # exited; its parent has not reaped it
        except FileNotFoundError:
            return True
        time.sleep(0.2)
    return False




DEFAULT_NAME = "SmolLM2-135M-Instruct"  # the default model's served name when no --model is given


def default_model_server(*extra: str, api_key: str | None = None) -> Server:
    """The embedded default model as its users start it, with the settings the client suites
    share: a 2k context, 600 pages, no warm-up (the few programs a suite needs compile on first
    use), served under its own name."""
    from mistral_jax.loading.default_model import default_model_path

    return Server(default_model_path(), "--served-model-name", DEFAULT_NAME, "--max-model-len", "2048",
                  "--num-pages", "600", "--no-warmup", *extra, api_key=api_key)
