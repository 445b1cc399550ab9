"""Runs tiny training jobs in a process with several (fake CPU) devices, for test_scale.py.

    python tests/scale_worker.py SPEC.json

SPEC: {"devices": 4,                                  # fake CPU devices of this process
       "distributed": {"port": 12345, "num_processes": 2, "process_id": 0},   # optional
       "runs": [{"name": "baseline", "arg": "method=sqrt", "overrides": {...},
                 "workdir": "...", "out": "result.json"}, ...]}

Each run calls train.train_and_evaluate on the tiny config and writes
{"history_last": <its return value>, "devices": ..., "process": ...} to `out`;
a run whose training raises ValueError writes {"error": message} instead.
The device count is forced before JAX starts, so the pytest process that
launches this keeps its single device.
"""

import json
import os
import sys
from pathlib import Path


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = (f"{flags} --xla_force_host_platform_device_count="
                               f"{spec['devices']}").strip()
    import jax  # only after XLA_FLAGS is set

    dist = spec.get("distributed")
    if dist:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{dist['port']}",
                                   num_processes=dist["num_processes"],
                                   process_id=dist["process_id"])
    from flaxpals import train
    from tests.test_train_e2e import tiny

    for run in spec["runs"]:
        config = tiny(run["name"], run.get("arg", ""), **run.get("overrides", {}))
        try:
            result = {"history_last": train.train_and_evaluate(config, run["workdir"])}
        except ValueError as e:
            result = {"error": str(e)}
        result.update(devices=jax.device_count(), local_devices=jax.local_device_count(),
                      process=jax.process_index(), processes=jax.process_count())
        out = Path(run["out"])
        out.write_text(json.dumps(result))
    if dist:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
