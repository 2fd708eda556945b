"""A process pool whose parent enforces a wall-clock limit per task by killing the worker.

`concurrent.futures` cannot stop one running task, and math-verify's own timeouts need the main
thread of a process, so each task runs in the main thread of a worker; one that runs past its
limit (or dies) is replaced and its task gets the default value.
"""
from __future__ import annotations

import multiprocessing as mp
import time
from collections import deque
from multiprocessing.connection import Connection, wait
from typing import Any, Callable

PRELOAD = ["r1mega.rewards.math", "r1mega.rewards.code"]  # imported once in the fork server


def _serve(conn: Connection) -> None:
    while True:
        try:
            fn, args, kwargs = conn.recv()
        except EOFError:
            return
        try:
            conn.send(fn(*args, **kwargs))
        except Exception:  # a grader bug or a pathological input scores the default
            conn.send(None)


class _Worker:
    def __init__(self, ctx) -> None:
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child,), daemon=True)
        self.process.start()
        child.close()
        self.task: int | None = None
        self.deadline = 0.0

    def stop(self) -> None:
        self.process.kill()
        self.process.join()
        self.conn.close()


class WorkerPool:
    def __init__(self, workers: int) -> None:
        self._ctx = mp.get_context("forkserver")
        self._ctx.set_forkserver_preload(PRELOAD)
        self._workers = [_Worker(self._ctx) for _ in range(workers)]

    def run(self, tasks: list[tuple[Callable, tuple, dict, float]], default: Any = None) -> list[Any]:
        """Results of `fn(*args, **kwargs)` for each (fn, args, kwargs, limit_s), `default` on timeout or error."""
        results = [default] * len(tasks)
        queue = deque(range(len(tasks)))
        idle = deque(self._workers)
        busy: dict[Connection, _Worker] = {}
        while queue or busy:
            while queue and idle:
                worker, i = idle.popleft(), queue.popleft()
                fn, args, kwargs, limit = tasks[i]
                worker.conn.send((fn, args, kwargs))
                worker.task, worker.deadline = i, time.monotonic() + limit
                busy[worker.conn] = worker
            timeout = max(0.0, min(w.deadline for w in busy.values()) - time.monotonic())
            for conn in wait(list(busy), timeout):
                worker = busy.pop(conn)
                try:
                    value = conn.recv()
                except (EOFError, OSError):  # the worker died (e.g. out of memory)
                    idle.append(self._replace(worker))
                    continue
                if value is not None:
                    results[worker.task] = value
                idle.append(worker)
            now = time.monotonic()
            for conn, worker in list(busy.items()):
                if worker.deadline <= now:
                    del busy[conn]
                    idle.append(self._replace(worker))
        return results

    def _replace(self, worker: _Worker) -> _Worker:
        worker.stop()
        fresh = _Worker(self._ctx)
        self._workers[self._workers.index(worker)] = fresh
        return fresh

    def close(self) -> None:
        for worker in self._workers:
            worker.stop()
        self._workers = []
