import os
import threading
import time
from pathlib import Path

import pytest

import tfcli.decode_attention as decode_attention
from tfcli import native

SOURCE = decode_attention.SOURCE


@pytest.fixture
def fresh_build(tmp_path, monkeypatch):
    """native.load() as on a machine that never built anything: its own cache directory, nothing cached."""
    monkeypatch.setenv("TFCLI_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TFCLI_NO_KERNEL", raising=False)
    native.load.cache_clear()
    yield tmp_path / "cache"
    native.load.cache_clear()


def test_the_build_is_cached_by_source_compiler_and_cpu(fresh_build):
    built = native.load(SOURCE)
    if built is None:
        pytest.skip("no C compiler here")
    (library,) = fresh_build.glob("decode_attention-*.so")  # (flags that failed leave markers)
    stamp = library.stat().st_mtime_ns
    native.load.cache_clear()
    assert native.load(SOURCE)._name == built._name  # found, not rebuilt
    assert library.stat().st_mtime_ns == stamp and not list(fresh_build.glob("tmp*"))


def test_without_a_working_compiler_there_is_nothing_and_it_is_tried_once(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    runs = []
    real_run = native._run
    monkeypatch.setattr(native, "_run", lambda *a, **k: runs.append(a) or real_run(*a, **k))
    assert native.load(SOURCE) is None
    assert len(runs) == len(native.flag_sets())
    assert {p.suffix for p in fresh_build.iterdir()} == {".failed"}  # no half-built libraries left
    native.load.cache_clear()  # the next process
    assert native.load(SOURCE) is None and len(runs) == len(native.flag_sets())


def test_a_build_that_could_not_finish_is_tried_again_next_time(fresh_build, monkeypatch):
    if native.compiler() is None:
        pytest.skip("no C compiler here")

    def killed(*args, **kwargs):
        return native.subprocess.CompletedProcess(args[0], -9)
    real_run = native._run
    monkeypatch.setattr(native, "_run", killed)
    assert native.load(SOURCE) is None
    assert list(fresh_build.iterdir()) == []  # no marker, no temporary file
    monkeypatch.setattr(native, "_run", real_run)
    native.load.cache_clear()
    assert native.load(SOURCE) is not None


def test_a_compiler_that_hangs_is_waited_for_once(fresh_build, monkeypatch):
    """Each flag set waited out the timeout, and again after `prepare` had: 12 minutes, then the
    same in every later process."""
    if native.compiler() is None:
        pytest.skip("no C compiler here")
    runs = []

    def hangs(*args, **kwargs):
        runs.append(args[0])
        raise native.subprocess.TimeoutExpired(args[0], native.BUILD_TIMEOUT_S)
    monkeypatch.setattr(native, "_run", hangs)
    assert native.load(SOURCE) is None and len(runs) == 1
    assert {p.suffix for p in fresh_build.iterdir()} == {".failed"}
    native.load.cache_clear()  # the next process
    assert native.load(SOURCE) is None and len(runs) == 1


def test_cc_may_be_a_command_line(fresh_build, monkeypatch):
    cc = native.compiler()
    if cc is None:
        pytest.skip("no C compiler here")
    monkeypatch.setenv("CC", f"env {cc}")  # (as "ccache gcc" is)
    assert native.compiler() == f"env {cc}" and native.load(SOURCE) is not None
    monkeypatch.setenv("CC", "'unbalanced")
    assert native.compiler() is None


def test_tfcli_no_kernel_turns_it_off(fresh_build, monkeypatch):
    monkeypatch.setenv("TFCLI_NO_KERNEL", "1")
    assert native.load(SOURCE) is None


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_an_unwritable_cache_directory_builds_in_a_temporary_one(fresh_build):
    fresh_build.mkdir()
    fresh_build.chmod(0o500)
    try:
        where = native.cache_dir()
        assert where != fresh_build and os.access(where, os.W_OK)
    finally:
        fresh_build.chmod(0o700)


def test_threads_asking_at_once_build_once_and_prepare_starts_it(fresh_build, monkeypatch):
    if native.compiler() is None:
        pytest.skip("no C compiler here")
    runs = []
    real_run = native._run
    monkeypatch.setattr(native, "_run", lambda *a, **k: runs.append(a) or real_run(*a, **k))
    prepared = native.prepare(SOURCE.name)  # as `tfcli sample` does before importing torch
    got = []
    threads = [threading.Thread(target=lambda: got.append(native.load(SOURCE))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads + prepared:
        t.join()
    commands = [tuple(a[0][:-3]) for a in runs]  # all but the temporary output's name
    assert runs and len(commands) == len(set(commands))  # no flag set built twice
    assert len({lib._name for lib in got}) == 1 and got[0] is not None


def test_temporary_files_of_builds_that_died_are_removed(fresh_build):
    if native.compiler() is None:
        pytest.skip("no C compiler here")
    fresh_build.mkdir()
    stale, fresh = fresh_build / "tmpdead.so", fresh_build / "tmpbuilding.so"
    stale.write_bytes(b""), fresh.write_bytes(b"")
    os.utime(stale, (time.time() - native.STALE_S - 1,) * 2)
    native.load(SOURCE)
    assert not stale.exists() and fresh.exists()  # another process may be building that one right now


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_a_process_that_exits_mid_build_takes_its_compiler_and_temporary_file_with_it(fresh_build, tmp_path):
    """A Ctrl-C during start-up left the compilers running after tfcli exited, and their output in
    the cache as tmp*.so files until a later run cleared them."""
    import subprocess
    import sys

    slow = tmp_path / "slowcc"  # a "compiler" that writes its output, then takes its time
    slow.write_text('#!/bin/sh\nwhile [ "$1" != -o ]; do shift; done; : > "$2"\n'
                    'sleep 30 &\necho $$ $! > "$PIDFILE"\nwait\necho late > "$2"\n')  # (a child, as gcc's cc1 and ld)
    slow.chmod(0o755)
    env = {**os.environ, "CC": str(slow), "PIDFILE": str(tmp_path / "pid"),
           "PYTHONPATH": str(Path(native.__file__).parents[1])}
    code = ("import time; from tfcli import native; native.prepare('decode_attention.c'); "
            "import pathlib; p = pathlib.Path(__import__('os').environ['PIDFILE'])\n"
            "while not p.exists() or not p.read_text(): time.sleep(0.05)\ntime.sleep(0.3)")
    subprocess.run([sys.executable, "-c", code], env=env, timeout=20, check=True)
    time.sleep(0.2)
    assert [pid for pid in (tmp_path / "pid").read_text().split() if running(pid)] == []  # (its `sleep` too)
    assert not list(fresh_build.glob("tmp*"))


def running(pid: str) -> bool:
    """Whether a process still runs (an orphan's zombie may wait a while for init to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_a_hung_compiler_and_its_children_are_stopped_at_the_timeout(fresh_build, tmp_path, monkeypatch):
    """After the kill, waiting for the output pipes that its children still held open hung tfcli."""
    slow = tmp_path / "hangcc"
    slow.write_text('#!/bin/sh\nsleep 30 &\necho $$ $! > "$PIDFILE"\nwait\n')  # (a child holding its output open)
    slow.chmod(0o755)
    monkeypatch.setenv("CC", str(slow))
    monkeypatch.setenv("PIDFILE", str(tmp_path / "pid"))
    monkeypatch.setattr(native, "BUILD_TIMEOUT_S", 0.5)
    started = time.monotonic()
    assert native.load(SOURCE) is None
    assert time.monotonic() - started < 10  # (one flag set's timeout, then the rest marked as failed)
    assert [pid for pid in (tmp_path / "pid").read_text().split() if running(pid)] == []
    assert not list(fresh_build.glob("tmp*"))
