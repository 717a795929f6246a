"""A ``ddppo train`` command run as its own process and stopped by SIGTERM once it has saved a resume state: how the
signal tests interrupt a real run (the embedded backend's in test_train.py, habitat's in test_habitat_train.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def ddppo_command() -> list[str]:
    """The installed ``ddppo`` entry point beside this interpreter, else ``python -m ddppo``."""
    exe = Path(sys.executable).with_name("ddppo")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "ddppo"]


def sigterm_after_resume_state(cmd: list[str], run_dir: Path, log_path: Path, timeout_s: float = 180
                               ) -> tuple[int, str]:
    """Run ``cmd``, send SIGTERM once ``run_dir/resume.pt`` exists, and return (exit code, console output). Fails if
    the process ends first or writes no resume state within ``timeout_s``; the process never outlives the call."""
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        try:
            deadline = time.monotonic() + timeout_s
            while not (run_dir / "resume.pt").is_file():
                assert proc.poll() is None, f"trainer exited early:\n{log_path.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"no resume state written within {timeout_s:.0f} s"
                time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return rc, log_path.read_text()
