"""TensorBoard event files, written with TensorBoard's own record writer and protobuf messages.

Only `tensorboard`'s plain-Python pieces are imported (its record writer and its compiled protos): no
TensorFlow, no torch, no background flush thread. Each run (a site, or "global") has one file that
this server process appends to round after round and closes after every write, so the job folder is
complete on disk whenever download_job zips it. A restarted server starts a new file (a crash may have
cut the old one's last record); TensorBoard reads every file of a run, and where a resumed round writes a
step again it keeps the newer points.

Blocking file I/O: call it through asyncio.to_thread.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path

FILE_PREFIX = "events.out.tfevents."  # what TensorBoard looks for in a run's folder
FILE_VERSION = "brain.Event:2"


def event_file_name(started_s: float) -> str:
    """One file name per server process and job: TensorBoard orders a run's files by name."""
    return f"{FILE_PREFIX}{int(started_s):010d}.fedkit.{os.getpid()}"


class EventFile:
    """One run's event file: scalar points appended as (tag, step, value), each batch in one open/close."""

    def __init__(self, run_dir: Path, started_s: float):
        self.path = run_dir / event_file_name(started_s)

    def append(self, points: Iterable[tuple[str, int, float]], wall_time_s: float | None = None) -> int:
        """Write the points (points of one step share an event); returns how many were written."""
        from tensorboard.compat.proto import event_pb2, summary_pb2  # the server's only tensorboard imports
        from tensorboard.summary.writer.record_writer import RecordWriter

        by_step: dict[int, list[summary_pb2.Summary.Value]] = {}
        for tag, step, value in points:
            by_step.setdefault(int(step), []).append(summary_pb2.Summary.Value(tag=tag, simple_value=float(value)))
        if not by_step:
            return 0
        wall_time_s = time.time() if wall_time_s is None else wall_time_s
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists()
        with self.path.open("ab") as f:
            writer = RecordWriter(f)
            if new:
                writer.write(event_pb2.Event(wall_time=wall_time_s, file_version=FILE_VERSION).SerializeToString())
            for step, values in by_step.items():
                event = event_pb2.Event(wall_time=wall_time_s, step=step, summary=summary_pb2.Summary(value=values))
                writer.write(event.SerializeToString())
            f.flush()
        return sum(len(v) for v in by_step.values())


__all__ = ["FILE_PREFIX", "EventFile", "event_file_name"]
