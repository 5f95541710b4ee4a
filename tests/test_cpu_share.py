"""A compute step takes its fair share of the CPUs: what it may use, less what others use, split among the
langops jobs computing on the machine, asked again while it runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from langops.cpu_share import Claim, CpuShare, cgroup_cpu_limit, fair_threads, other_claims, usable_cpus

pytestmark = pytest.mark.unit


def test_alone_on_idle_cores_a_job_takes_them_all():
    assert fair_threads(usable=4, others=[], load=0.0, own_threads=0) == 4


def test_jobs_split_the_cores_evenly_and_never_get_less_than_one_thread():
    other = Claim(pid=1, started=0.0, threads=2)
    assert fair_threads(usable=4, others=[other], load=2.0, own_threads=0) == 2
    assert fair_threads(usable=2, others=[other], load=2.0, own_threads=0) == 1
    assert fair_threads(usable=2, others=[other, other, other], load=6.0, own_threads=0) == 1


def test_cores_kept_busy_by_other_programs_are_left_to_them():
    assert fair_threads(usable=4, others=[], load=2.0, own_threads=0) == 2
    assert fair_threads(usable=2, others=[], load=5.0, own_threads=0) == 1


def test_the_load_of_this_job_and_of_the_other_langops_jobs_is_not_counted_twice():
    # Alone with 2 threads, a load of 2 is this job's own: it keeps both.
    assert fair_threads(usable=2, others=[], load=2.0, own_threads=2) == 2
    # Two jobs with one thread each: the load of 2 is theirs, and each keeps its half.
    other = Claim(pid=1, started=0.0, threads=1)
    assert fair_threads(usable=2, others=[other], load=2.0, own_threads=1) == 1
    # No load average on this system: the split among jobs alone decides.
    assert fair_threads(usable=4, others=[other], load=None, own_threads=0) == 2


@pytest.mark.parametrize(("files", "expected"), [
    ({"cpu.max": "150000 100000\n"}, 1.5),
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3.0),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),
])
def test_a_cgroup_quota_is_read_from_either_cgroup_version(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpu_limit(tmp_path) == expected


def test_usable_cpus_follow_the_affinity_mask():
    assert 1 <= usable_cpus() <= len(os.sched_getaffinity(0))


def test_a_number_in_params_is_used_as_given(tmp_path):
    applied = []
    with CpuShare(3, apply=applied.append, folder=tmp_path) as share:
        assert share.threads == 3
    assert applied == [3]


def test_a_claim_is_left_while_computing_and_given_back_at_the_end(tmp_path):
    with CpuShare(None, folder=tmp_path) as share:
        claim = json.loads((tmp_path / f"{os.getpid()}.json").read_text())
        assert claim == {"pid": os.getpid(), "started": psutil.Process().create_time(), "threads": share.threads}
    assert not list(tmp_path.glob("*.json"))


def test_claims_of_dead_jobs_and_of_reused_process_ids_are_ignored_and_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    (tmp_path / "dead.json").write_text(json.dumps({"pid": int(dead.stdout), "started": 0.0, "threads": 2}))
    parent = psutil.Process().parent()  # alive, but not the process that wrote this claim
    (tmp_path / "reused.json").write_text(json.dumps({"pid": parent.pid, "started": 1.0, "threads": 2}))
    (tmp_path / "torn.json").write_text('{"pid": ')
    assert other_claims(tmp_path) == []
    assert sorted(path.name for path in tmp_path.iterdir()) == ["torn.json"]


def _job_holding_a_share(folder: Path) -> subprocess.Popen:
    """Another process on this machine that enters its share, says how many threads it got, and waits."""
    code = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from langops.cpu_share import CpuShare
        with CpuShare(None, folder=Path({str(folder)!r})) as share:
            print(share.threads, flush=True)
            sys.stdin.readline()
    """)
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


@pytest.mark.skipif(usable_cpus() < 2, reason="needs two usable CPUs to split")
def test_a_running_job_gives_up_threads_when_another_starts_and_takes_them_back_when_it_ends(tmp_path, monkeypatch):
    monkeypatch.setattr("langops.cpu_share._load_average", lambda: None)  # the split alone, whatever the machine does
    applied: list[int] = []
    with CpuShare(None, apply=applied.append, folder=tmp_path) as share:
        alone = share.threads
        assert alone == usable_cpus()
        other = _job_holding_a_share(tmp_path)
        try:
            assert 1 <= int(other.stdout.readline()) <= usable_cpus() // 2
            assert share.refresh(force=True) and share.threads == usable_cpus() // 2
        finally:
            other.communicate("\n", timeout=60)
        assert share.refresh(force=True) and share.threads == alone
    assert applied == [alone, usable_cpus() // 2, alone]


def test_the_share_is_asked_again_only_now_and_then(tmp_path):
    with CpuShare(None, folder=tmp_path) as share:
        before = (tmp_path / f"{os.getpid()}.json").stat().st_mtime_ns
        time.sleep(0.01)
        assert share.refresh() is False
        assert (tmp_path / f"{os.getpid()}.json").stat().st_mtime_ns == before

