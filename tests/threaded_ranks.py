"""Several ranks of one process group as threads of this process, sharing its CPU or its one GPU.

Each thread joins torch's threaded process group (the in-process backend torch's own distributed
tests use) as one rank of the default group, so code under test calls the ordinary
``torch.distributed`` collectives (all-gather, all-reduce, reduce-scatter) and they really move
data between the ranks' tensors. Nothing of the code under test is replaced: on a GPU every rank
runs the CUDA branch with the fused kernels, on a CPU the reference branch.

Why threads on one GPU are an honest stand-in for one GPU per rank: all threads launch on the
device's default stream, so every kernel a rank enqueues before a collective runs before the
copies that collective enqueues; autograd's per-device worker threads are off in the ranks' threads,
so each rank runs its own backward (two ranks' backwards on the GPU's one worker thread would wait
on each other's collectives forever).

torch has no public API for this backend; its module is ``torch.testing._internal``, which is
why the private names below are imported here and nowhere else.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist
from torch.testing._internal.distributed.multi_threaded_pg import (
    ProcessLocalGroup,
    _install_threaded_pg,
    _uninstall_threaded_pg,
)

Result = TypeVar("Result")


def run_ranks(world: int, rank_main: Callable[[int], Result], timeout_s: float = 300.0) -> list[Result]:
    """``[rank_main(0), ..., rank_main(world - 1)]``, each called on its own thread as that rank of
    a ``world``-rank default process group. Re-raises the first rank's error (a rank that fails
    wakes the others from their collectives) and raises TimeoutError after ``timeout_s``."""
    results: list = [None] * world
    failures: list[tuple[int, BaseException]] = []
    # Functional collectives (what compiled code calls) look process groups up by name; isolation
    # gives every thread its own names, as every process has its own.
    torch._C._distributed_c10d._set_thread_isolation_mode(True)
    threads_world = _install_threaded_pg()
    if not hasattr(type(threads_world), "comms"):
        # torch 2.11's destroy_process_group finalizes the world's torchcomms communicators, a list
        # its threaded world lacks (torch 2.13's has it); a threaded group has none: an empty list.
        threads_world.comms = []
    store = dist.HashStore()

    def thread_main(rank: int) -> None:
        try:
            dist.init_process_group("threaded", rank=rank, world_size=world, store=store)
            try:
                # Each rank runs its own backward (see the module docstring); the group's
                # constructor does this too, but that is its own detail.
                with torch.autograd.set_multithreading_enabled(False):
                    results[rank] = rank_main(rank)
            finally:
                dist.destroy_process_group()  # inside the outer try: a failed teardown fails the rank
        except BaseException as error:  # SystemExit too: how a rank woken by another's failure leaves
            failures.append((rank, error))
            ProcessLocalGroup.exception_handle(error)

    threads = [threading.Thread(target=thread_main, args=(rank,), name=f"rank{rank}", daemon=True) for rank in range(world)]
    try:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + timeout_s
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        stuck = [thread.name for thread in threads if thread.is_alive()]
        if stuck:
            ProcessLocalGroup.exception_handle(TimeoutError())  # wakes those waiting in a collective
            for thread in threads:
                thread.join(5.0)
            raise TimeoutError(f"{', '.join(stuck)} still running after {timeout_s} s")
    finally:
        ProcessLocalGroup.reset()
        _uninstall_threaded_pg()
        torch._C._distributed_c10d._set_thread_isolation_mode(False)
    if failures:  # the first rank that failed by itself, not one woken by it
        rank, error = min(failures, key=lambda failure: (isinstance(failure[1], SystemExit), failure[0]))
        raise RuntimeError(f"rank {rank} of {world} failed: {type(error).__name__}: {error}") from error
    return results


def shard(x: torch.Tensor, world: int, rank: int, dim: int) -> torch.Tensor:
    """Rank ``rank``'s head and tail chunks of ``x`` along ``dim`` (the context-parallel layout),
    computed without a process group."""
    chunks = x.chunk(2 * world, dim=dim)
    return torch.cat([chunks[rank], chunks[2 * world - 1 - rank]], dim=dim)


def unshard(parts: Sequence[torch.Tensor], dim: int) -> torch.Tensor:
    """The whole tensor from every rank's head/tail part along ``dim`` (``parts[r]`` from rank r)."""
    halves = [part.chunk(2, dim=dim) for part in parts]
    return torch.cat([head for head, _ in halves] + [tail for _, tail in reversed(halves)], dim=dim)
