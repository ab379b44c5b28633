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
