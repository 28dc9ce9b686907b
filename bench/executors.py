"""Cells as jobs: ``bench run --executor slurm`` submits each pending cell as one task of a Slurm job array
through submitit; ``--executor submitit-local`` takes the same path with local subprocesses instead of
``sbatch`` (no cluster needed; the tests use it). ``--executor local``, the default, is the in-process loop
of ``bench.runner`` and never comes here.

A task runs ``runner.run_one_cell``: the local loop's code for one cell, under the cell's lock. All of a
cell's progress lives in its folder (an atomic checkpoint after every epoch), so a task that is preempted or
reaches its time limit needs no state of its own: submitit's ``checkpoint`` hook resubmits the same call,
and the requeued task resumes after the last finished epoch (the epoch in progress is lost).

When it submits, the driver writes ``<cell>/.job.json`` (job id, executor, log file) so that ``bench status``
can say "queued (job id)" and, once the job has ended without a result, "failed (its log's last line)".
The marker says nothing by itself: its job's state is asked of the scheduler (sacct through submitit on
Slurm, the controller's pid for submitit-local), a finished cell ignores it, and the next submission
replaces it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from bench import data as datamod
from bench import runner
from bench.config import Cell, Suite
from bench.errors import BenchError
from bench.store import atomic_write_json

EXECUTORS = ("local", "slurm", "submitit-local")
JOB_MARKER = ".job.json"
SLURM_QUEUED = ("PENDING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESV_DEL_HOLD", "CONFIGURING", "SUSPENDED")
SLURM_RUNNING = ("RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING", "RESIZING")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "executor", "where the cells run: in this process (local), or one job per cell through submitit")
    g.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="local: one cell after another in this process (default); slurm: every pending cell as a "
                        "task of one Slurm job array (needs `pip install -e '.[slurm]'` and sbatch on PATH); "
                        "submitit-local: the same jobs as local subprocesses (all at once), to try a submission "
                        "without a cluster")
    g.add_argument("--partition", help="Slurm partition (default: the cluster's)")
    g.add_argument("--gpus-per-cell", type=int, default=1, metavar="N", help="GPUs per cell's job (default 1)")
    g.add_argument("--cpus-per-cell", type=int, metavar="N", help="CPUs per cell's job (default: the cluster's)")
    g.add_argument("--timeout-min", type=int, default=24 * 60, metavar="MIN",
                   help="time limit of each job in minutes (default 1440); a job that reaches it is requeued and "
                        "resumes from its last epoch")
    g.add_argument("--max-timeouts", type=int, default=10, metavar="N",
                   help="how often a cell's job may reach its time limit and be requeued (default 10; preemptions "
                        "do not count)")
    g.add_argument("--array-parallelism", type=int, default=256, metavar="N",
                   help="at most this many of the array's tasks run at once (default 256)")
    g.add_argument("--log-folder", metavar="DIR",
                   help="submitit's folder for job pickles and logs (default: <out>/.submitit). It MUST be on a "
                        "filesystem shared by the submitting machine and the compute nodes, as --out must")
    g.add_argument("--slurm-arg", action="append", metavar="KEY=VALUE",
                   help="any other sbatch option, e.g. account=proj or qos=high (repeatable)")
    g.add_argument("--wait", action="store_true",
                   help="block until every job this command submits ends, then print the table; exit status 1 if "
                        "any failed (default: print the job ids and return)")


@dataclass(frozen=True)
class JobMarker:
    """``<cell>/.job.json``: the job a driver submitted for the cell."""

    job: str
    executor: str
    host: str
    log: str
    log_folder: str
    submitted: str

    def write(self, folder: Path) -> None:
        atomic_write_json(folder / JOB_MARKER, asdict(self))

    @classmethod
    def read(cls, folder: Path) -> JobMarker | None:
        try:
            return cls(**json.loads((folder / JOB_MARKER).read_text()))
        except (OSError, ValueError, TypeError):
            return None


class _Requeued:
    """``checkpoint`` (called by submitit on preemption or time-out) requeues the same call: a cell's epoch
    checkpoint, or a slice's missing part file, is all the state a resumed job needs."""

    cell: Cell

    def checkpoint(self) -> Any:
        from submitit.helpers import DelayedSubmission

        print(f"{self.cell.label}: requeued by submitit; it resumes where it stopped", file=sys.stderr)
        return DelayedSubmission(self)


class CellTask(_Requeued):
    """One cell as a submitit job (training only, when its evaluation runs in slices)."""

    def __init__(self, cell: Cell, out: Path, data_dir: Path, device: str, replace_stale: bool,
                 evaluate: bool = True):
        self.cell, self.out, self.data_dir, self.device, self.replace_stale = cell, out, data_dir, device, replace_stale
        self.evaluate = evaluate

    def __call__(self) -> str:
        return runner.run_one_cell(self.cell, self.out, self.data_dir, self.device, self.replace_stale, self.evaluate)


class SliceTask(_Requeued):
    """One slice of a trained cell's evaluation (``--eval-shards``) as a submitit job."""

    def __init__(self, cell: Cell, out: Path, data_dir: Path, device: str, k: int, n: int):
        self.cell, self.out, self.data_dir, self.device, self.k, self.n = cell, out, data_dir, device, k, n

    def __call__(self) -> str:
        return runner.run_one_slice(self.cell, self.out, self.data_dir, self.device, self.k, self.n)


def _submitit() -> Any:
    try:
        import submitit
    except ImportError:
        raise BenchError("--executor slurm/submitit-local needs submitit: pip install -e '.[slurm]'") from None
    return submitit


def _parse_slurm_args(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise BenchError(f"--slurm-arg expects KEY=VALUE (an sbatch option without its dashes), got {item!r}")
        out[key.strip().lstrip("-")] = value
    return out


def make_executor(args: argparse.Namespace, out: Path) -> Any:
    """A submitit ``AutoExecutor`` set up from the command line; one-line errors for what is missing."""
    for name, low in (("--gpus-per-cell", 0), ("--cpus-per-cell", 1), ("--timeout-min", 1), ("--max-timeouts", 0),
                      ("--array-parallelism", 1)):
        value = getattr(args, name[2:].replace("-", "_"))
        if value is not None and value < low:
            raise BenchError(f"{name} must be at least {low}, got {value}")
    if args.device == "cuda" and args.gpus_per_cell == 0:
        raise BenchError("--device cuda with --gpus-per-cell 0: the jobs would have no GPU")
    submitit = _submitit()
    cluster = "slurm" if args.executor == "slurm" else "local"
    if cluster == "slurm" and (shutil.which("sbatch") is None or shutil.which("srun") is None):
        raise BenchError("--executor slurm needs Slurm on this machine (sbatch and srun on PATH); submit from the "
                         "cluster's login node, or use --executor local")
    folder = Path(args.log_folder) if args.log_folder else out / ".submitit"
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster, slurm_max_num_timeout=args.max_timeouts,
                                     local_max_num_timeout=args.max_timeouts)
    executor.update_parameters(
        # N GPUs: N tasks, one per GPU, that train the cell together (bench.distributed).
        name="certbench", timeout_min=args.timeout_min, nodes=1, tasks_per_node=max(1, args.gpus_per_cell),
        gpus_per_node=args.gpus_per_cell or None, cpus_per_task=args.cpus_per_cell,
        slurm_partition=args.partition, slurm_array_parallelism=args.array_parallelism,
        slurm_additional_parameters=_parse_slurm_args(args.slurm_arg or []) or None,
    )
    return executor


def job_states(markers: dict[Cell, JobMarker]) -> dict[Cell, str]:
    """queued / running / ended / unknown for each marked cell's job, as its scheduler knows it now."""
    states: dict[Cell, str] = {}
    slurm = {cell: m for cell, m in markers.items() if m.executor == "slurm"}
    for cell, marker in markers.items():
        if marker.executor != "slurm":
            states[cell] = _local_state(marker)
    if slurm:
        try:
            submitit = _submitit()
        except BenchError:
            return {**states, **{cell: "unknown" for cell in slurm}}
        # Every job is registered before the first state is asked: submitit then asks sacct once for all.
        jobs = {cell: submitit.SlurmJob(folder=m.log_folder, job_id=m.job) for cell, m in slurm.items()}
        for cell, job in jobs.items():
            states[cell] = _slurm_state(job.state)
    return states


def _slurm_state(state: str) -> str:
    name = state.split()[0] if state else "UNKNOWN"
    if name in SLURM_QUEUED:
        return "queued"
    if name in SLURM_RUNNING:
        return "running"
    return "unknown" if name == "UNKNOWN" else "ended"


def _local_state(marker: JobMarker) -> str:
    """submitit-local's job id is its controller's pid, alive while the job runs (or waits to requeue)."""
    if marker.host != platform.node():
        return "unknown"
    try:
        os.kill(int(marker.job), 0)
    except ProcessLookupError:
        return "ended"
    except (PermissionError, ValueError):
        return "unknown"
    return "running"


def last_log_line(log: str | Path) -> str:
    try:
        lines = [line.strip() for line in Path(log).read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return f"no log at {log}"
    return lines[-1] if lines else f"empty log {log}"


def _submit(executor: Any, tasks: list[Any]) -> list[Any]:
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    try:
        with executor.batch():
            return [executor.submit(task) for task in tasks]
    except (FailedJobError, FailedSubmissionError, OSError) as exc:
        detail = [line for line in str(exc).splitlines() if line.strip()]
        raise BenchError(f"submission failed: {detail[-1] if detail else exc.__class__.__name__}") from None


def _submit_slices(args: argparse.Namespace, executor: Any, todo: list[Cell], out: Path, suite: str) -> int:
    """One job per missing evaluation slice of every trained pending cell; untrained cells are named."""
    from bench import slices

    data_dir = datamod.data_dir(args.data_dir).resolve()
    untrained = [c for c in todo if not slices.trained(runner.cell_folder(c, out), c)]
    failed = 0
    if untrained:
        # Training first, one job per cell; the slices need its model.
        jobs = _submit(executor, [CellTask(c, out.resolve(), data_dir, args.device, args.replace_stale, False)
                                  for c in untrained])
        labels = [f"{cell.label} training" for cell in untrained]
        for label, job in zip(labels, jobs):
            print(f"{job.job_id}\t{label}")
        if not args.wait:
            print(f"submitted {len(jobs)} training jobs; run the same command again when they have finished to "
                  "submit the evaluation slices (or add --wait)", file=sys.stderr)
            return 0
        failed += _wait(labels, jobs)
    wanted = [args.eval_shard] if args.eval_shard is not None else range(args.eval_shards)
    tasks = [SliceTask(c, out.resolve(), data_dir, args.device, k, args.eval_shards) for c in todo
             if slices.trained(runner.cell_folder(c, out), c) for k in wanted
             if not (runner.cell_folder(c, out) / slices.part_file(k, args.eval_shards)).exists()]
    if tasks:
        jobs = _submit(executor, tasks)
        labels = [f"{task.cell.label} slice {task.k} of {task.n}" for task in tasks]
        for label, job in zip(labels, jobs):
            print(f"{job.job_id}\t{label}")
        print(f"submitted {len(jobs)} evaluation slices ({args.executor}); logs in {executor.folder}", file=sys.stderr)
        if args.wait:
            failed += _wait(labels, jobs)
    if args.wait:
        runner.print_table(out, args.scale, suite)
    return 1 if failed else 0


def _wait(labels: list[str], jobs: list[Any]) -> int:
    """Block until the jobs end; name each failed one with the last line of its log; the number that failed."""
    failed = 0
    for label, job in zip(labels, jobs):
        try:
            job.results()  # every task's result: a cell on N devices is N tasks
        except Exception:  # submitit raises the job's own error, or that it ended without a result
            failed += 1
            print(f"  {label}: job {job.job_id} failed: {last_log_line(job.paths.stderr)}", file=sys.stderr)
    return failed


def submit_cells(args: argparse.Namespace, suite: Suite, todo: list[Cell], out: Path) -> int:
    """Submit every pending cell that no live job holds yet; print the job ids; with ``--wait``, the table."""
    if args.certifier:
        raise BenchError("--certifier runs in this process: use it with --executor local once the jobs are done")
    executor = make_executor(args, out)
    if args.eval_shards is not None:
        return _submit_slices(args, executor, todo, out, suite.name)
    markers = {c: m for c in todo if (m := JobMarker.read(runner.cell_folder(c, out))) is not None}
    live = {c: s for c, s in job_states(markers).items() if s in ("queued", "running")}
    for cell in live:
        print(f"  {cell.label}: not submitted, job {markers[cell].job} is {live[cell]}", file=sys.stderr)
    cells = [c for c in todo if c not in live]
    if not cells:
        print("nothing to submit", file=sys.stderr)
        if args.wait:
            runner.print_table(out, args.scale, suite.name)
        return 0
    data_dir = datamod.data_dir(args.data_dir).resolve()
    jobs = _submit(executor, [CellTask(c, out.resolve(), data_dir, args.device, args.replace_stale) for c in cells])
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for cell, job in zip(cells, jobs):
        JobMarker(job.job_id, args.executor, platform.node(), str(job.paths.stderr), str(executor.folder),
                  now).write(runner.cell_folder(cell, out))
        print(f"{job.job_id}\t{cell.label}")
    print(f"submitted {len(jobs)} cells ({args.executor}); logs in {executor.folder}", file=sys.stderr)
    if not args.wait:
        print(f"follow them with: python -m bench status --suite {args.suite} --scale {args.scale} --out {out}",
              file=sys.stderr)
        return 0
    failed = _wait([cell.label for cell in cells], jobs)
    runner.print_table(out, args.scale, suite.name)
    return 1 if failed else 0
