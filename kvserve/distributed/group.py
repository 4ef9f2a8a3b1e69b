"""The ranks of one tensor-parallel engine and how they meet.

Three ways in, one result (`TPGroup`):
- a process with no rank (`kvserve serve -tp 2`, `LLM(tensor_parallel_size=2)`) becomes rank 0
  and spawns ranks 1..N-1 on this machine (`torch.multiprocessing`, spawn), which rendezvous
  with it over TCP on 127.0.0.1;
- a process with RANK / WORLD_SIZE in its environment (torchrun, or one of those spawned ranks)
  joins by env:// at MASTER_ADDR:MASTER_PORT;
- a process already in a process group uses it.
Backend: gloo for CPU tensors, NCCL for CUDA tensors (one group with both, so each rank picks by
its device). Three timeouts: the rendezvous fails after KVSERVE_DIST_START_TIMEOUT seconds
(default 300: every rank loads its share of the model first); the compute collectives after
KVSERVE_DIST_TIMEOUT (default 120), which is how a hung rank is noticed; step descriptions travel
on a gloo group of their own with no practical timeout, since a worker waits for the next step
as long as the server idles.
"""
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger("kvserve.distributed")
FOREVER = timedelta(days=365)


class RankFailure(RuntimeError):
    """A rank died, hung past the timeout, or a collective failed: the engine cannot go on."""


def dist_timeout() -> float:
    return float(os.environ.get("KVSERVE_DIST_TIMEOUT", "120"))


def start_timeout() -> float:
    return float(os.environ.get("KVSERVE_DIST_START_TIMEOUT", "300"))


@dataclass
class TPGroup:
    rank: int
    world: int
    device: str
    step_group: object = None  # gloo group for step descriptions
    compute_group: object = None  # the forward's collectives, with KVSERVE_DIST_TIMEOUT
    procs: list = field(default_factory=list)  # ranks this process spawned (rank 0 of a local launch)
    failure: str | None = None  # the first failure seen; every later collective raises it
    owns_process_group: bool = False  # created here: destroyed on close
    closed: bool = False
    collective_seconds: float = 0.0  # wall time in collectives on this rank (waits for slower ranks included)
    collectives: int = 0  # collectives run (step descriptions included)
    steps: int = 0  # steps run (counted by the executor)

    # ---- collectives that remember the first failure --------------------------------------

    def _run(self, fn, *args, **kwargs):
        if self.failure:
            raise RankFailure(self.failure)
        start = time.perf_counter()
        self.collectives += 1
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # gloo: peer gone or timeout; NCCL: watchdog errors
            self._name_dead_rank()  # a rank that exited says more than the socket error it caused
            if "timed out" in str(e).lower() or "timeout" in str(e).lower():
                self.fail(f"a tensor-parallel collective did not complete within {dist_timeout():g} s "
                          f"(KVSERVE_DIST_TIMEOUT): a rank hangs ({type(e).__name__}: {str(e)[:200]})")
            self.fail(f"a tensor-parallel collective failed ({type(e).__name__}: {str(e)[:300]})")
            raise RankFailure(self.failure) from e
        finally:
            self.collective_seconds += time.perf_counter() - start

    def _name_dead_rank(self, wait: float = 1.0) -> None:
        deadline = time.monotonic() + wait
        while self.procs and time.monotonic() < deadline:
            for r, p in enumerate(self.procs, 1):
                if not p.is_alive():
                    self.fail(f"tensor-parallel rank {r} (pid {p.pid}) exited with code {p.exitcode}")
                    return
            time.sleep(0.05)

    def fail(self, reason: str) -> None:
        if self.failure is None:
            self.failure = reason
            log.error("tensor parallelism failed: %s", reason)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (an empty tensor skips the collective on every rank alike)."""
        if t.numel():
            self._run(dist.all_reduce, t, group=self.compute_group)
        return t

    def all_gather_last(self, t: torch.Tensor) -> torch.Tensor:
        """[..., m] on each rank -> [..., world * m], rank order."""
        if not t.numel():
            return t.new_empty(*t.shape[:-1], t.shape[-1] * self.world)
        parts = [torch.empty_like(t) for _ in range(self.world)]
        self._run(dist.all_gather, parts, t.contiguous(), group=self.compute_group)
        return torch.cat(parts, -1)

    def broadcast_step(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's int64 tensor to every rank, on the step channel (CPU, gloo)."""
        self._run(dist.broadcast, t, 0, group=self.step_group)
        return t

    def min_int(self, value: int) -> int:
        """The smallest of every rank's value (e.g. KV pages: each rank sized them from its free memory)."""
        t = torch.tensor([value], dtype=torch.int64)
        self._run(dist.all_reduce, t, dist.ReduceOp.MIN, group=self.step_group)
        return int(t)

    # ---- lifetime ------------------------------------------------------------------------

    def watch(self) -> None:
        """Rank 0 of a local launch: a thread that notices a spawned rank's exit at once (a rank
        that hangs is noticed by the collective timeout instead)."""
        def loop():
            while not self.closed:
                for r, p in enumerate(self.procs, 1):
                    if not p.is_alive() and not self.closed:
                        self.fail(f"tensor-parallel rank {r} (pid {p.pid}) exited with code {p.exitcode}")
                        return
                time.sleep(0.2)
        threading.Thread(target=loop, name="kvserve-tp-watch", daemon=True).start()

    def close(self, timeout: float = 10.0) -> None:
        """Ends the spawned ranks (they stop on the stop message, else are killed; at once after a
        failure: a hung rank never reads it) and leaves the process group; safe to call twice."""
        if self.closed:
            return
        self.closed = True
        deadline = time.monotonic() + (0 if self.failure else timeout)
        for p in self.procs:
            p.join(max(0.1, deadline - time.monotonic()))
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        if self.owns_process_group and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - a broken group cannot always be torn down cleanly
                pass


def join(config) -> TPGroup:
    """This process's place in the tensor-parallel group of an EngineConfig's engine (see the
    module doc); spawned ranks build their engine from the same config."""
    world, device, timeout = config.tensor_parallel_size, config.device, start_timeout()
    procs = []
    if dist.is_initialized():
        rank, owns = dist.get_rank(), False
        if dist.get_world_size() != world:
            raise ValueError(f"--tensor-parallel-size {world} but the process group has {dist.get_world_size()} ranks")
    else:
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            rank, env_world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            if env_world != world:
                raise ValueError(f"--tensor-parallel-size {world} but WORLD_SIZE={env_world} (torchrun "
                                 f"--nnodes x --nproc-per-node must equal it)")
        else:
            rank = 0
            os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(_free_port())
            procs = _spawn_ranks(world, config)
    local = int(os.environ.get("LOCAL_RANK", rank))
    rank_device = _rank_device(device, local)
    if rank_device.startswith("cuda"):
        torch.cuda.set_device(rank_device)
    if not dist.is_initialized():
        _init_process_group(rank, world, device, timeout, procs)
        owns = True
    group = TPGroup(rank, world, rank_device, procs=procs, owns_process_group=owns)
    group.step_group = dist.new_group(backend="gloo", timeout=FOREVER)
    group.compute_group = dist.new_group(backend=_backend(rank_device), timeout=timedelta(seconds=dist_timeout()))
    if procs:
        group.watch()
    return group


def _init_process_group(rank: int, world: int, device: str, timeout: float, procs: list) -> None:
    """env:// (under torchrun, the agent's store); on a thread, so that a spawned rank that dies
    while starting (a bad model path, out of memory) fails the start-up at once, not at the timeout."""
    addr = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    backend = _backend(device)
    errors = []

    def init():
        try:
            dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                                    timeout=timedelta(seconds=timeout))
        except Exception as e:  # noqa: BLE001 - re-raised below with the address
            errors.append(e)

    thread = threading.Thread(target=init, name="kvserve-rendezvous", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
        dead = [(r, p) for r, p in enumerate(procs, 1) if not p.is_alive()]
        if dead and thread.is_alive():
            for p in procs:
                p.kill()
            r, p = dead[0]
            raise RankFailure(f"tensor-parallel rank {r} exited with code {p.exitcode} while starting "
                              f"(rendezvous at {addr})")
    if errors:
        e = errors[0]
        raise RankFailure(f"the tensor-parallel rendezvous at {addr} (rank {rank} of {world}) did not "
                          f"complete within {timeout:g} s: {type(e).__name__}: {str(e)[:300]}") from None


def _backend(device: str) -> str:
    return "cpu:gloo,cuda:nccl" if _uses_cuda(device) else "gloo"


def _uses_cuda(device: str) -> bool:
    return str(device).startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def _rank_device(device: str, local_rank: int) -> str:
    """cuda:LOCAL_RANK where this rank has a GPU of its own, else the CPU."""
    if device == "auto":
        return f"cuda:{local_rank}" if torch.cuda.device_count() > local_rank else "cpu"
    if device == "cuda":
        return f"cuda:{local_rank}"
    return device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_ranks(world: int, config) -> list:
    import torch.multiprocessing as mp
    from kvserve.distributed import worker
    ctx = mp.get_context("spawn")
    procs = []
    for rank in range(1, world):
        env = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": os.environ["MASTER_ADDR"], "MASTER_PORT": os.environ["MASTER_PORT"]}
        p = ctx.Process(target=worker.run_spawned, args=(config, env, os.getpid()), name=f"kvserve-tp{rank}",
                        daemon=True)
        p.start()
        procs.append(p)
    return procs


def threads_per_rank(threads: int | None, world: int) -> int:
    """The cores (or --threads) shared out among this machine's ranks, at least one each."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return max(1, (threads or os.cpu_count() or 1) // local_world)
