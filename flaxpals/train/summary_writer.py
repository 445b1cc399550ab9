"""TensorBoard scalars without TensorFlow: one event file per run, written as it goes.

    writer = SummaryWriter(workdir / "tensorboard", enabled=process_index == 0)
    writer.write_scalars(step, {"loss/sst": 0.9, "dev/average": 0.61})
    writer.flush(); writer.close()

The file is TensorBoard's own format (`events.out.tfevents.*`: tensorboard's
Event and Summary protos in its record framing, a `simple_value` per scalar),
so TensorBoard, `tensorboard.backend.event_processing` and tf.summary readers
all read it. The training loop writes only scalars; `clu.metric_writers` writes
the same but imports TensorFlow, seconds at every start, for nothing else here.
Paths go through etils.epath, so a gs:// workdir works; on such storage the
file appears when flushed or closed. A disabled writer (every process but the
first) writes nothing.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from collections.abc import Mapping

from etils import epath
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

_WRITERS = itertools.count()


class SummaryWriter:
    """write_scalars / flush / close, as clu's MetricWriter names them."""

    def __init__(self, logdir: str | os.PathLike, *, enabled: bool = True):
        self._records = None
        self.path: epath.Path | None = None  # the event file; None when disabled
        if not enabled:
            return
        logdir = epath.Path(logdir)
        logdir.mkdir(parents=True, exist_ok=True)
        # The counter keeps two writers of one process in one second from sharing a file
        # (the second would truncate the first's events).
        name = (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
                f"{os.getpid()}.{next(_WRITERS)}")
        self.path = logdir / name
        self._records = RecordWriter(self.path.open("wb"))
        self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
        self.flush()

    def _write(self, event: event_pb2.Event) -> None:
        self._records.write(event.SerializeToString())

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        if self._records is None:
            return
        values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v))
                  for k, v in scalars.items()]
        self._write(event_pb2.Event(wall_time=time.time(), step=int(step),
                                    summary=summary_pb2.Summary(value=values)))

    def flush(self) -> None:
        if self._records is not None:
            self._records.flush()

    def close(self) -> None:
        if self._records is not None:
            self._records.close()
            self._records = None
