"""Several ranks of one gloo process group as processes of this machine, sharing its CPU or its one GPU.

What this is for: ``torch.compile`` of code that issues ``torch.distributed`` collectives. Dynamo
turns a collective into a graph node only when the group is one of torch's C++ process groups;
torch 2.11's dynamo cannot trace the threaded group of tests/threaded_ranks.py (a Python
``ProcessGroup``): it fails with ``UserDefinedObjectVariable(ProcessLocalGroup)``. NCCL refuses
two ranks on one GPU, but gloo runs all-gather and all-reduce on CUDA tensors (staged through host
memory), and those are the collectives the context-parallel path issues off NCCL. Nothing of the
code under test is replaced: on a GPU every rank runs the CUDA branch on ``cuda:0``, on a CPU the
reference branch.

A rank's function runs in a fresh (spawned) process, so it and its arguments must pickle: a
module-level function and CPU tensors. What it returns comes back through ``torch.save`` (CUDA
tensors arrive on the CPU).
"""

from __future__ import annotations

import faulthandler
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TERMINATE_GRACE_S = 5.0
"""How long a rank still running at the timeout gets to leave after SIGTERM before SIGKILL."""


def run_rank_processes(world: int, rank_main: Callable[..., Any], args: tuple = (), timeout_s: float = 300.0) -> list:
    """``[rank_main(0, *args), ..., rank_main(world - 1, *args)]``, each called in its own process
    as that rank of a ``world``-rank gloo default process group. A rank that raises or crashes
    ends the run: the others are stopped and a RuntimeError names that rank and carries its
    traceback (for a crash, faulthandler's: the signal and every thread's stack). After
    ``timeout_s`` the ranks still running are stopped and TimeoutError names them."""
    with tempfile.TemporaryDirectory(prefix="ranks-") as folder:
        context = mp.start_processes(
            _rank_entry, args=(world, folder, rank_main, args, timeout_s), nprocs=world, join=False, start_method="spawn"
        )
        deadline = time.monotonic() + timeout_s
        try:
            while not context.join(timeout=max(0.0, deadline - time.monotonic()), grace_period=TERMINATE_GRACE_S):
                if time.monotonic() >= deadline:
                    stuck = [f"rank{rank}" for rank, process in enumerate(context.processes) if process.is_alive()]
                    _stop(context.processes)
                    raise TimeoutError(f"{', '.join(stuck)} still running after {timeout_s} s")
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as error:  # start_processes has stopped the other ranks
            # A rank that crashed wrote no failure record, but the ranks it left waiting did:
            # its fault record comes first.
            first = _first_fault(folder, world) or _first_failure(folder)
            if first is None:  # the rank died without raising or crashing (an exit)
                raise RuntimeError(f"rank {error.error_index} of {world} failed: {error}") from None
            rank, trace = first
            raise RuntimeError(f"rank {rank} of {world} failed: {trace}") from None
        return [torch.load(os.path.join(folder, f"rank{rank}.pt"), map_location="cpu", weights_only=False) for rank in range(world)]


def _rank_entry(rank: int, world: int, folder: str, rank_main: Callable[..., Any], args: tuple, timeout_s: float) -> None:
    # A rank killed by a signal (a crash in a collective or a kernel) leaves no Python traceback
    # to record below; faulthandler writes the signal and where each of its threads was.
    faulthandler.enable(open(os.path.join(folder, f"rank{rank}.fault"), "w"), all_threads=True)
    # The cores shared among the ranks, not all of them for each: oversubscribed ranks crawl.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # every rank is on this machine
    store = dist.FileStore(os.path.join(folder, "store"), world)
    # The group's own timeout is a backstop for ranks left behind by a parent that died: longer than
    # the parent's, whose TimeoutError names the stuck ranks.
    group_timeout = timedelta(seconds=2 * timeout_s)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=group_timeout)
    try:
        result = rank_main(rank, *args)
    except BaseException:
        # Written before this rank leaves the group, which is what makes the ranks waiting on it
        # fail (connection reset): the earliest record names the rank that failed by itself.
        with open(os.path.join(folder, f"rank{rank}.failure"), "w") as record:
            record.write(f"{time.monotonic_ns()}\n{traceback.format_exc()}")
        raise
    finally:
        dist.destroy_process_group()
    torch.save(result, os.path.join(folder, f"rank{rank}.pt"))
    # Leave without the interpreter's teardown. After a Trainer on gloo, that teardown now and then
    # aborts a rank whose work is done and saved: "terminate called without an active exception",
    # with no Python frame. It happened about once in 25 runs of the context-parallel Trainer check,
    # on CI and here, with a TCP or a file store. That is torch's and gloo's shutdown, which these
    # tests do not check.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _first_failure(folder: str) -> tuple[int, str] | None:
    """The rank whose failure was recorded first, and its traceback."""
    records = []
    for name in os.listdir(folder):
        if name.endswith(".failure"):
            with open(os.path.join(folder, name)) as record:
                stamp, trace = record.read().split("\n", 1)
            records.append((int(stamp), int(name[len("rank") : -len(".failure")]), trace))
    return min(records)[1:] if records else None


def _first_fault(folder: str, world: int) -> tuple[int, str] | None:
    """The lowest rank that faulthandler saw crash (a fatal signal), and where its threads were."""
    for rank in range(world):
        path = os.path.join(folder, f"rank{rank}.fault")
        if os.path.exists(path):
            with open(path) as record:
                trace = record.read().strip()
            if trace:
                return rank, trace
    return None


def _stop(processes) -> None:
    for process in processes:
        if process.is_alive():
            process.terminate()
    end = time.monotonic() + TERMINATE_GRACE_S
    for process in processes:
        process.join(max(0.0, end - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()
