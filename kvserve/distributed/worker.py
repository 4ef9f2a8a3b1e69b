"""A tensor-parallel rank other than 0: builds the same engine from the same config (its shard of
the weights and of the KV cache), then runs rank 0's steps until told to stop."""
import logging
import os
import sys
import threading
import time

log = logging.getLogger("kvserve.distributed")


def run_worker(config) -> int:
    """0 when rank 0 stopped the group, 1 when the group failed (rank 0 gone, a timeout), 2 when
    the model cannot be built (rank 0, building the same, says why)."""
    from kvserve.distributed.group import RankFailure
    from kvserve.engine.engine import Engine
    from kvserve.model.loader import ModelLoadError
    try:
        engine = Engine(config)
    except (ModelLoadError, ValueError) as e:
        log.error("%s", e)  # one line, no traceback: the user's error, not a crash
        return 2
    executor = engine.runner.executor
    try:
        executor.serve_forever()
        return 0
    except RankFailure as e:
        log.error("rank %d stops: %s", executor.group.rank, e)
        return 1
    finally:
        executor.group.close()


def run_spawned(config, env: dict, parent_pid: int) -> None:
    """Entry of a rank spawned by rank 0 on this machine."""
    os.environ.update(env)
    logging.basicConfig(level="WARNING", format=f"%(asctime)s rank {env['RANK']} %(levelname)s %(name)s: %(message)s")
    exit_with_parent(parent_pid)
    sys.exit(run_worker(config))


def exit_with_parent(parent_pid: int) -> None:
    """A rank whose rank 0 is gone (even killed with SIGKILL) exits instead of lingering."""
    def watch():
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)
    threading.Thread(target=watch, name="kvserve-parent-watch", daemon=True).start()
