"""The evaluator: serial, process and Ray backends run the same tasks to the same results."""
from __future__ import annotations

import pytest
from gymnasium.error import DependencyNotInstalled

from dreamenv.parallel import run_tasks


def square(x: int) -> int:
    return x * x


def test_serial_and_process_agree() -> None:
    tasks = list(range(7))
    assert list(run_tasks(square, tasks, backend="serial")) == [t * t for t in tasks]
    assert sorted(run_tasks(square, tasks, backend="process", workers=2)) == [t * t for t in tasks]
    assert list(run_tasks(square, [], backend="process")) == []


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="serial, process, ray"):
        run_tasks(square, [1], backend="threads")
    with pytest.raises(ValueError, match="workers"):
        run_tasks(square, [1], workers=0)


def test_ray_backend() -> None:
    try:
        import ray
    except ImportError:
        with pytest.raises(DependencyNotInstalled, match="pip install"):
            list(run_tasks(square, [1, 2], backend="ray"))
        return
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert sorted(run_tasks(square, range(5), backend="ray", workers=2)) == [0, 1, 4, 9, 16]
    finally:
        ray.shutdown()


def test_process_workers_die_with_their_parent(tmp_path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    pids = tmp_path / "pids"
    script = f"""
import os, time
from dreamenv.parallel import run_tasks
from tests.test_parallel import sleep_and_record
list(run_tasks(sleep_and_record, [{str(pids)!r}] * 2, backend="process", workers=2))
"""
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=os.getcwd())
    deadline = time.monotonic() + 60
    while (not pids.is_file() or len(pids.read_text().split()) < 2) and time.monotonic() < deadline:
        time.sleep(0.1)
    workers = [int(pid) for pid in pids.read_text().split()]
    assert len(workers) == 2
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in workers), "a worker outlived its killed parent"


def test_a_script_without_a_main_guard_is_told_to_add_one(tmp_path) -> None:
    """Spawned workers run the calling script again; unguarded, they die, and the error says what to do."""
    import os
    import subprocess
    import sys

    script = tmp_path / "unguarded.py"
    script.write_text('from dreamenv.parallel import run_tasks\nprint(list(run_tasks(abs, [1, -2], backend="process")))\n')
    guarded = tmp_path / "guarded.py"
    guarded.write_text('from dreamenv.parallel import run_tasks\nif __name__ == "__main__":\n'
                       '    print(sorted(run_tasks(abs, [1, -2], backend="process")))\n')
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode != 0
    assert 'RuntimeError: a real-env worker process died' in run.stderr and 'if __name__ == "__main__":' in run.stderr
    run = subprocess.run([sys.executable, str(guarded)], capture_output=True, text=True, env=env, timeout=120)
    assert (run.returncode, run.stdout) == (0, "[1, 2]\n")


def sleep_and_record(path: str) -> None:
    import os
    import time

    with open(path, "a") as handle:
        handle.write(f"{os.getpid()}\n")
    time.sleep(60)


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie has exited; it waits only for its reaping
        return stat.read().split()[2] != "Z"
