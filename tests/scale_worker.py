"""Runs tiny training jobs in a process with a chosen number of (fake CPU) devices.

    python tests/scale_worker.py SPEC.json

SPEC: {"devices": 4,                       # CPU devices of this process
       "xla_flags": "...",                 # optional, appended to XLA_FLAGS
       # optional: join a job of several processes through flaxpals.train.parallel.initialize
       # ("auto", as `python -m flaxpals.main` does) with a loopback coordinator
       "distributed": {"port": 12345, "num_processes": 2, "process_id": 0},
       "runs": [{"name": "baseline", "arg": "method=sqrt", "overrides": {...},
                 "workdir": "...", "out": "result.json"}, ...]}

Each run calls `loop.train_and_evaluate` on the tiny config (tests/test_train_e2e.tiny)
and writes to `out`: {"history_last": its return value, "params": "<out>.npz" (the
latest checkpoint's params by tree path), "step", "opt_state_dtypes" (of the
non-scalar optimiser state leaves), "devices", "local_devices", "process",
"processes"}; or {"error": message} when
training raises ValueError. The device count is forced before JAX starts, so the
pytest process that launches this keeps its own single device.
"""

import json
import logging
import os
import sys
from pathlib import Path


def main(spec_path: str) -> None:
    # flaxpals' messages (the mesh line the tests read) at INFO, as the command line shows them.
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("flaxpals").setLevel(logging.INFO)
    spec = json.loads(Path(spec_path).read_text())
    os.environ["XLA_FLAGS"] = " ".join(filter(None, [
        os.environ.get("XLA_FLAGS", ""), spec.get("xla_flags", ""),
        f"--xla_force_host_platform_device_count={spec['devices']}"]))
    import jax  # only after XLA_FLAGS is set
    import numpy as np

    from flaxpals.train import parallel

    dist = spec.get("distributed")
    if dist:  # the environment a launcher sets (launch/gpu.sh), then flaxpals' own rule
        os.environ.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{dist['port']}",
                          JAX_NUM_PROCESSES=str(dist["num_processes"]),
                          JAX_PROCESS_ID=str(dist["process_id"]))
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    assert parallel.initialize("auto") == bool(dist)
    import orbax.checkpoint as ocp

    from flaxpals.train import loop
    from flaxpals.train.checkpointing import Checkpoints
    from tests.conftest import tiny

    for run in spec["runs"]:
        config = tiny(run["name"], run.get("arg", ""), **run.get("overrides", {}))
        out = Path(run["out"])
        try:
            result = {"history_last": loop.train_and_evaluate(config, run["workdir"])}
        except ValueError as e:
            result = {"error": str(e)}
        else:  # the latest checkpoint, restored as saved (this process's device layout)
            ckpts = Checkpoints(run["workdir"], config.checkpoint.keep)
            step = ckpts.latest.latest_step()
            saved = ckpts.latest.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(), train=ocp.args.StandardRestore()))
            ckpts.close()
            flat = {jax.tree_util.keystr(p): parallel.to_host(x)
                    for p, x in jax.tree_util.tree_flatten_with_path(saved["params"])[0]}
            result["params"] = str(out.with_suffix(".npz"))
            result["step"] = int(step)
            result["opt_state_dtypes"] = sorted({str(x.dtype) for x in
                                                 jax.tree.leaves(saved["train"]["opt_state"])
                                                 if x.ndim > 0})
            if jax.process_index() == 0:
                np.savez(result["params"], **flat)
        result.update(devices=jax.device_count(), local_devices=jax.local_device_count(),
                      process=jax.process_index(), processes=jax.process_count())
        out.write_text(json.dumps(result))
    if dist:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
