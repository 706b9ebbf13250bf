"""``compress --nproc N``: start N ranks of the same command through torch's elastic launcher (what ``torchrun
--nproc-per-node N -m moecompress compress ...`` does), and turn a failed rank into one error line.

Each rank is ``python -m moecompress compress ...`` with the same arguments (less ``--nproc``), started by torch's
elastic agent, which sets ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` and stops every rank when one fails. Every rank's
output reaches the terminal with a ``[rankN]:`` prefix and is kept in a per-rank log file under ``--log-dir``. A
rank that fails writes its one-line error into the error file the agent gives it (``TORCHELASTIC_ERROR_FILE``, the
format torchrun reads too, so a torchrun summary names the same cause); a rank that failed only because another one
went away (a broken collective) marks its error as such, so the error printed here is the one that started it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from moecompress.distributed import is_communication_error
from moecompress.errors import MoECompressError

ERROR_FILE_VARIABLE = "TORCHELASTIC_ERROR_FILE"
# Set for ranks started by ``--nproc``: the launching process prints the summary, not rank 0.
LAUNCHED_BY_US_VARIABLE = "MOECOMPRESS_LAUNCHED"


class RankFailed(MoECompressError):
    """One rank of a run over several processes failed; the others were stopped."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def default_log_dir() -> Path:
    """A fresh folder for the ranks' logs (never beside the input or inside --out, which the ranks check first)."""
    return Path(tempfile.mkdtemp(prefix="moecompress-ranks-"))


def launch_ranks(nproc: int, arguments: list[str], log_dir: Path, *, threads_per_rank: int | None) -> None:
    """Run ``python -m moecompress *arguments`` as ``nproc`` ranks on this machine; returns when all succeeded,
    raises :class:`RankFailed` naming the rank that failed first otherwise."""
    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)  # the agent's start-up chatter
    log_dir.mkdir(parents=True, exist_ok=True)
    if threads_per_rank is not None:  # ranks share the cores (torchrun likewise sets OMP_NUM_THREADS=1)
        arguments = [*arguments, "--threads", str(threads_per_rank)]
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"moecompress-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.2,
        logs_specs=DefaultLogsSpecs(log_dir=str(log_dir), redirects=Std.ALL, tee=Std.ALL),
        log_line_prefix_template="[rank${rank}]: ",
    )
    print(f"moecompress: {nproc} ranks; per-rank logs in {log_dir}", file=sys.stderr)
    os.environ[LAUNCHED_BY_US_VARIABLE] = "1"  # the agent hands its environment to the ranks
    try:
        elastic_launch(config, sys.executable)("-m", "moecompress", *arguments)
    except ChildFailedError as failed:
        raise first_failure(failed.failures, nproc, log_dir) from None
    finally:
        os.environ.pop(LAUNCHED_BY_US_VARIABLE, None)


def first_failure(failures: dict, nproc: int, log_dir: Path) -> RankFailed:
    """The error of the rank that failed first among those that did not fail only because another rank had
    (``failures``: the agent's ``{rank: ProcessFailure}``)."""
    def key(item):
        rank, failure = item
        recorded = _recorded(failure)
        return (bool(recorded.get("communication", False)), recorded.get("time", float("inf")), rank)

    rank, failure = min(failures.items(), key=key)
    recorded = _recorded(failure)
    message = recorded.get("message") or failure.message or f"exit code {failure.exitcode}"
    exit_code = failure.exitcode if failure.exitcode > 0 else 1
    return RankFailed(f"rank {rank} of {nproc} failed: {message} (the other ranks were stopped; finished work is "
                      f"kept: re-run the same command to resume; logs in {log_dir})", exit_code)


def _recorded(failure) -> dict:
    data = getattr(failure, "error_file_data", None) or {}
    return data.get("moecompress", {}) if isinstance(data, dict) else {}


def record_rank_failure(error: BaseException, rank: int) -> None:
    """Write ``error`` into this rank's error file, when a launcher gave one (``TORCHELASTIC_ERROR_FILE``)."""
    path = os.environ.get(ERROR_FILE_VARIABLE)
    if not path:
        return
    text = str(error) if isinstance(error, (MoECompressError, KeyboardInterrupt, OSError, MemoryError)) \
        else f"{type(error).__name__}: {error}"
    message = " ".join(text.split()) or type(error).__name__
    record = {"message": message, "timestamp": int(time.time()),
              "moecompress": {"rank": rank, "message": message, "time": time.time(),
                              "communication": is_communication_error(error)}}
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(record))
    except OSError:
        pass  # the error still reaches the rank's log
