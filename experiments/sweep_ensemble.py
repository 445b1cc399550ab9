"""The sweep's ensemble rows: a row's seeds averaged as one model (flaxpals/serve/ensemble.py).

    python -m experiments.sweep --results=docs/results --only=best-val --seeds=0,1,2 --ensemble

After the rows, each flaxpals row whose seeds have all finished is scored as an
ensemble of those seeds' best checkpoints: `flaxpals.main --mode=eval
--ensemble=<seed workdirs> --workdir=<results>/<slug>-ensemble`, which writes
`eval-ensemble.json` (the ensemble's dev metrics and each member's own) next to
the sweep's `sweep.json`. The report shows it as a row of its own, labelled
ensemble (`sweep_report.collect`). A seed whose folder holds the
`best-outputs.npz` its training wrote is read from that file (the same outputs,
no restore), so the rows' committed records suffice; a seed without one needs
its best checkpoint in its workdir.
"""

from __future__ import annotations

import sys
from pathlib import Path

from experiments import sweep_common


def workdir_of(results: Path, slug: str) -> Path:
    return results / f"{slug}-ensemble"


def command(members: list[Path], workdir: Path, python: str = sys.executable,
            display: bool = False) -> list[str]:
    """`flaxpals.main --mode=eval --ensemble=...`: the members' best checkpoints averaged
    (flaxpals/serve/ensemble.py), scored on dev into <workdir>/eval-ensemble.json."""
    return [("python" if display else python), "-m", "flaxpals.main", "--mode=eval",
            "--ensemble=" + ",".join(str(m) for m in members), f"--workdir={workdir}"]


def member(seed_workdir: Path) -> Path:
    """What scores a seed: its best-outputs.npz where its training wrote one, else the
    workdir (its best checkpoint)."""
    from flaxpals import workdir_format

    saved = seed_workdir / workdir_format.OUTPUTS_FILE
    return saved if saved.exists() else seed_workdir


def seed_name(member_path) -> str:
    """The seed's folder name of a member (a workdir or the best-outputs.npz in it)."""
    from flaxpals.serve import ensemble

    path = Path(member_path)
    return path.parent.name if ensemble.is_saved(path) else path.name


def is_done(workdir: Path, members: list[Path]) -> bool:
    """Whether <workdir>/eval-ensemble.json scored these seeds (by folder name, so that
    a results folder moved elsewhere still counts, read from a file or a checkpoint)."""
    from flaxpals.serve import ensemble

    record = ensemble.read_eval(workdir)
    return record is not None and [seed_name(m) for m in record["members"]] == [
        seed_name(m) for m in members]


def set_aside(workdir: Path) -> None:
    """An ensemble of other seeds: its records move to `<name>.<n>`, kept, not overwritten."""
    for name in ("eval-ensemble.json", "sweep.json"):
        path = workdir / name
        if path.exists():
            n = 1
            while path.with_name(f"{name}.{n}").exists():
                n += 1
            path.rename(path.with_name(f"{name}.{n}"))


def collect(results: Path, row: sweep_common.Row) -> dict | None:
    """The report's row for `row`'s ensemble, or None when it has not been scored."""
    import json

    from flaxpals.serve import ensemble

    workdir = workdir_of(results, row.slug)
    record = ensemble.read_eval(workdir)
    if record is None:
        return None
    run = json.loads((workdir / "sweep.json").read_text()) \
        if (workdir / "sweep.json").exists() else {}
    n = len(record["members"])
    return {"slug": workdir.name, "group": "ensemble",
            "name": f"Ensemble of {n} seeds (averaged probabilities): {row.name}",
            "best": {k: v for k, v in record.items() if k.startswith("dev/")}, "std": {},
            "records": [], "params": None, "param_ratio": None, "n_seeds": n,
            "seconds": run.get("seconds"), "runs": run.get("runs", []), "budget": None,
            "command": run.get("command"), "commands": ({0: run["command"]}
                                                        if run.get("command") else {}),
            "epoch": "best of each", "done": True, "member_scores": record["member_scores"],
            "members": record["members"], "of": row.slug}
