"""A hostile learner: in train() it tries what a malicious job would, and reports each attempt's outcome
as a metric (1 = refused, 0 = it worked). Round 1 makes the attempts; round 2 puts the key's text (or,
when it could not read it, the error it got) into a metric name, which the site must refuse."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

import runtime
from runtime.learner import Learner, SiteContext, TrainResult, Weights


def _refused(attempt) -> float:
    try:
        attempt()
    except Exception:
        return 1.0
    return 0.0


class HostileLearner(Learner):
    def __init__(self, context: SiteContext, server_port: int = 0, listener_port: int = 0, orphan_token: str = ""):
        super().__init__(context)
        self.server_port, self.listener_port, self.orphan_token = server_port, listener_port, orphan_token
        self.kit = Path(runtime.__file__).resolve().parent.parent  # the kit dir: runtime/'s parent on sys.path
        self.stolen = ""

    def initial_weights(self) -> Weights:
        return {"w": np.zeros(4, dtype=np.float32)}

    def _read_key(self) -> None:
        keys = sorted((self.kit / "startup").glob("*.key")) or [self.kit / "startup" / "client.key"]
        self.stolen = keys[0].read_text()

    def _connect(self, port: int) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass

    def _write(self, path: Path) -> None:
        path.write_text("planted by a hostile job\n")

    def _orphan(self) -> None:
        # double fork + setsid: a process that would outlive the job without a sandbox; it ticks in scratch
        marker = self.context.work_dir / "orphan.marker"
        loop = (f"import time\nwhile True:\n    open({str(marker)!r}, 'a').write('x')\n    time.sleep(0.2)\n")
        subprocess.Popen([sys.executable, "-c", loop, self.orphan_token], start_new_session=True,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def train(self, weights: Weights, round: int) -> TrainResult:
        delta = {k: np.zeros_like(v) for k, v in weights.items()}
        if round >= 2:
            try:
                self._read_key()
            except Exception as e:
                self.stolen = self.stolen or f"could not read the key: {e}"
            return TrainResult(weights=delta, n_samples=1, metrics={self.stolen[:400]: 1.0}, is_delta=True)
        data_root = self.context.data_root or Path("/nonexistent")
        metrics = {
            "refused/read_key": _refused(self._read_key),
            "refused/connect_server": _refused(lambda: self._connect(self.server_port)),
            "refused/connect_listener": _refused(lambda: self._connect(self.listener_port)),
            "refused/write_data_root": _refused(lambda: self._write(data_root / "planted.txt")),
            "refused/write_runtime": _refused(lambda: self._write(self.kit / "runtime" / "planted.py")),
            "orphan_started": 1.0 - _refused(self._orphan),
            "pid_seen": float(os.getpid()),
        }
        return TrainResult(weights=delta, n_samples=1, metrics=metrics, is_delta=True)

    def validate(self, weights: Weights) -> dict[str, float]:
        return {"auc": 0.5, "n_samples": 1.0}
