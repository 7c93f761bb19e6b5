"""Start `appliance train` on several ranks through PyTorch's own launcher (torch.distributed.run).

The launcher is PyTorch's elastic agent, exactly what `torchrun` runs, called as a library so
that a failed rank becomes one message instead of the agent's report: each rank is this same
command without the launch flags, and finds its rank in the environment torchrun sets
(appliance.train.distributed). Rank 0 keeps the terminal; the other ranks write to log files.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import ApplianceError

LAUNCH_FLAGS = ("--nproc-per-node", "--nnodes", "--node-rank", "--master-addr", "--master-port")


class RankFailed(ApplianceError):
    """A rank died (a signal, an out-of-memory kill, a bug): not a user mistake, so exit 1."""

    exit_code = 1


@dataclass(frozen=True)
class Launch:
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None

    @property
    def needed(self) -> bool:
        """Only the launching process starts ranks: a rank itself has WORLD_SIZE set."""
        return (self.nproc_per_node > 1 or self.nnodes > 1) and "WORLD_SIZE" not in os.environ

    def check(self) -> None:
        if self.node_rank >= self.nnodes:
            raise ApplianceError(f"--node-rank {self.node_rank} with --nnodes {self.nnodes}: ranks count from 0.",
                                 f"give --node-rank 0 to {self.nnodes - 1}, a different one on each machine")
        if self.nnodes > 1 and (self.master_port is None or self.master_addr in ("127.0.0.1", "localhost")):
            raise ApplianceError("Training on several machines needs the address every machine reaches node 0 at.",
                                 "give --master-addr HOST --master-port PORT, the same on every machine (node 0's address)")


def rank_command(argv: list[str]) -> list[str]:
    """The command each rank runs: this one, without the launch flags."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in LAUNCH_FLAGS:
            skip = "=" not in arg
            continue
        out.append(arg)
    return ["-m", "appliance", *out]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(launch: Launch, argv: list[str], log_dir: Path) -> None:
    """Run `argv` (an `appliance train` command line) on every rank; raise RankFailed when one fails."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    launch.check()
    # The agent logs its rendezvous, restarts and failures itself; a failure is reported below instead.
    for name in [n for n in logging.root.manager.loggerDict if n.startswith("torch.distributed")]:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    if "OMP_NUM_THREADS" not in os.environ:  # as torchrun does: ranks must not each take every core
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // launch.nproc_per_node))
    port = launch.master_port or _free_port()
    quiet = {r: Std.ALL for r in range(launch.nproc_per_node) if launch.node_rank > 0 or r > 0}
    log_dir.mkdir(parents=True, exist_ok=True)
    config = LaunchConfig(
        min_nodes=launch.nnodes,
        max_nodes=launch.nnodes,
        nproc_per_node=launch.nproc_per_node,
        run_id=uuid.uuid4().hex[:8],
        rdzv_backend="static",
        rdzv_endpoint=f"{launch.master_addr}:{port}",
        rdzv_configs={"rank": launch.node_rank, "timeout": 900},
        max_restarts=0,
        logs_specs=DefaultLogsSpecs(log_dir=str(log_dir), redirects=quiet),
    )
    try:
        elastic_launch(config, sys.executable)(*rank_command(argv))
    except ChildFailedError as err:
        raise _failure(err, log_dir) from None


def _failure(err, log_dir: Path) -> Exception:
    main = err.failures.get(0)
    if main is not None and main.exitcode in (2, 130, 143):
        # Rank 0 printed its own message (a user mistake, or a stop with a checkpoint saved).
        return SystemExit(main.exitcode)
    rank, first = min(err.failures.items(), key=lambda f: f[1].timestamp)
    how = f"was killed by {signal.Signals(-first.exitcode).name}" if first.exitcode < 0 else f"exited with code {first.exitcode}"
    return RankFailed(
        f"Rank {rank} of the run {how}; the other ranks were stopped with it.",
        f"its output is under {log_dir}; continue from the last checkpoint with the same command and --resume",
    )
