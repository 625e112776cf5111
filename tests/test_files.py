"""Files for one run: files= in, Result.files and skipped_files out, the CLI's writer.

Every run here is a real worker's. What a hostile run can do to the host
through these paths is in tests/test_hostile_files.py.
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import subprocess
import sys
import time

import pytest
import pytest_asyncio

from sandbox import InputError, OutputLimitExceeded, Sandbox
from sandbox.files import write_files
from sandbox.runtime.files import MAX_DEPTH, Collection
from tests.conftest import IS_ROOT, quick_policy

MiB = 1024 * 1024
ESCAPE = "import random\nos = random._os\n"  # the guard is not what this module tests


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sb():
    tenants = {
        "small": quick_policy(scratch_mb=1, max_file_size_mb=1),
        "few": quick_policy(max_out_files=3, max_out_files_bytes=1000),
        # seccomp refuses mknod and unix-socket bind by default; without it a run can make a FIFO and a socket.
        "raw": quick_policy(skip_layers=["seccomp"], allowed_modules=["socket", "random"], denied_modules=[]),
        "readonly": quick_policy(filesystem="readonly"),
    }
    async with Sandbox(quick_policy(), tenants=tenants, workers=2) as sandbox:
        yield sandbox


in_module_loop = pytest.mark.asyncio(loop_scope="module")


@in_module_loop
async def test_files_are_written_before_the_code_starts_and_out_comes_back(sb):
    code = (
        "rows = open('data/in.csv').read().splitlines()\n"
        "with open('out/report.txt', 'w') as f:\n"
        "    f.write(str(len(rows)))\n"
        "open('out/raw.bin', 'wb').write(open('blob', 'rb').read()[::-1])\n"
    )
    r = await sb.run(code, files={"data/in.csv": b"a,b\n1,2\n", "blob": bytes(range(256))})
    assert r.outputs == {"rows": ["a,b", "1,2"]}
    assert r.files == {"report.txt": b"2", "raw.bin": bytes(range(256))[::-1]}  # unchanged inputs do not come back
    assert r.skipped_files == {}


@in_module_loop
async def test_nested_out_files_are_keyed_relative_to_out(sb):
    code = (
        ESCAPE + "os.makedirs('out/a/b')\nopen('out/a/b/c.txt', 'w').write('deep')\nopen('out/top', 'w').write('t')\n"
    )
    r = await sb.run(code)
    assert r.files == {"a/b/c.txt": b"deep", "top": b"t"}


@in_module_loop
async def test_a_rewritten_input_comes_back_under_its_input_path(sb):
    code = "open('data/in.csv', 'a').write('3,4\\n')\nopen('same.txt', 'w').write('same')\n"
    files = {"data/in.csv": b"a,b\n", "same.txt": b"same", "out/seed.txt": b"seed"}
    r = await sb.run(code, files=files)
    # rewritten with other bytes: returned; rewritten with the same bytes: nothing new; under out/: always
    assert r.files == {"data/in.csv": b"a,b\n3,4\n", "seed.txt": b"seed"}


@in_module_loop
async def test_a_rewritten_input_whose_name_out_also_holds_is_reported_not_merged(sb):
    code = "open('x.txt', 'w').write('input rewritten')\nopen('out/x.txt', 'w').write('from out')\n"
    r = await sb.run(code, files={"x.txt": b"original"})
    assert r.files == {"x.txt": b"from out"}
    assert "./out/ also holds" in r.skipped_files["x.txt"]


@in_module_loop
async def test_nothing_of_a_run_is_left_for_the_next_one(sb):
    await sb.run("open('out/left.txt', 'w').write('x')\nopen('in.txt', 'w').write('y')", files={"data/a": b"1"})
    for _ in range(2):  # both workers
        r = await sb.run(ESCAPE + "here = sorted(os.listdir('.'))\nout = os.listdir('out')")
        assert "data" not in r.outputs["here"] and "in.txt" not in r.outputs["here"]
        assert r.outputs["out"] == [] and r.files == {}


@in_module_loop
async def test_a_run_that_removed_out_still_returns_and_the_next_run_gets_a_fresh_one(sb):
    r = await sb.run(ESCAPE + "os.rmdir('out')\nopen('out', 'w').write('not a directory')")
    assert r.files == {}
    for _ in range(2):
        r = await sb.run("open('out/ok', 'w').write('1')")
        assert r.files == {"ok": b"1"}


@pytest.mark.parametrize(
    "path",
    ["/etc/passwd", "../escape", "a/../../b", "a/./b", "a//b", "a/", "", "a\0b", "./a", ".."],
    ids=["absolute", "parent", "climb", "dot", "empty_part", "trailing_slash", "empty", "nul", "leading_dot", "dotdot"],
)
@in_module_loop
async def test_a_bad_input_path_is_an_input_error_naming_it(sb, path):
    with pytest.raises(InputError) as info:
        await sb.run("x = 1", files={path: b"data"})
    assert repr(path) in str(info.value)


@in_module_loop
async def test_a_file_and_a_directory_of_the_same_name_are_refused(sb):
    with pytest.raises(InputError, match="would need 'a', which is also a file"):
        await sb.run("x = 1", files={"a": b"1", "a/b": b"2"})


@in_module_loop
async def test_a_tenant_whose_filesystem_is_readonly_takes_no_files(sb):
    with pytest.raises(InputError, match="filesystem is 'readonly'"):
        await sb.run("x = 1", tenant="readonly", files={"a.txt": b"1"})


@in_module_loop
async def test_input_files_are_bytes(sb):
    with pytest.raises(InputError, match="must be bytes, not str"):
        await sb.run("x = 1", files={"a.txt": "text"})


@in_module_loop
async def test_files_over_scratch_mb_are_refused_before_any_worker_is_used(sb):
    # The tenant's only warm worker is busy for a while; the refusal must not wait for it.
    busy = asyncio.ensure_future(sb.run("import time\ntime.sleep(2)", tenant="small"))
    await asyncio.sleep(0.3)
    started = time.monotonic()
    files = {f"part{i}": b"x" * (MiB // 2) for i in range(3)}  # 1.5 MiB, each part within max_file_size_mb
    with pytest.raises(InputError, match=r"over the tenant's scratch_mb \(1 MiB\)"):
        await sb.run("x = 1", tenant="small", files=files)
    assert time.monotonic() - started < 1.0
    with pytest.raises(InputError, match=r"'big' takes .* over max_file_size_mb \(1\)"):
        await sb.run("x = 1", tenant="small", files={"big": b"x" * (MiB + 1)})
    await busy


@in_module_loop
async def test_too_many_out_files_fail_the_run_naming_max_out_files(sb):
    code = "for i in range(4):\n    open(f'out/{i}', 'w').write('x')\n"
    with pytest.raises(OutputLimitExceeded) as info:
        await sb.run(code, tenant="few")
    assert info.value.limit == "max_out_files" and "max_out_files" in str(info.value)
    assert (await sb.run("for i in range(3):\n    open(f'out/{i}', 'w').write('x')", tenant="few")).files


@in_module_loop
async def test_out_files_over_the_byte_budget_fail_the_run_naming_max_out_files_bytes(sb):
    with pytest.raises(OutputLimitExceeded) as info:
        await sb.run("open('out/a', 'w').write('x' * 600)\nopen('out/b', 'w').write('y' * 600)", tenant="few")
    assert info.value.limit == "max_out_files_bytes" and "max_out_files_bytes" in str(info.value)
    # A rewritten input counts against the same budget; an unchanged one does not, however large.
    with pytest.raises(OutputLimitExceeded, match="max_out_files_bytes"):
        await sb.run("open('in', 'w').write('z' * 1001)", tenant="few", files={"in": b"small"})
    r = await sb.run("x = 1", tenant="few", files={"in": b"q" * 5000})
    assert r.files == {}


@in_module_loop
async def test_symlinks_fifos_and_sockets_in_out_are_reported_never_read(sb):
    code = ESCAPE + (
        "os.symlink('/etc/passwd', 'out/passwd')\n"
        "open('secret', 'w').write('s')\n"
        "os.symlink('../secret', 'out/inside')\n"
        "os.mkfifo('out/pipe')\n"
        "import socket\n"
        "_s = socket.socket(socket.AF_UNIX)\n"
        "_s.bind('out/sock')\n"
        "open('out/real', 'w').write('r')\n"
    )
    r = await sb.run(code, tenant="raw")  # a FIFO read would block: the run returning at all is part of the test
    assert r.files == {"real": b"r"}
    assert r.skipped_files == {
        "passwd": "symbolic link (never followed)",
        "inside": "symbolic link (never followed)",
        "pipe": "FIFO (never read)",
        "sock": "socket (never read)",
    }


@in_module_loop
async def test_an_input_replaced_by_a_symlink_is_reported_not_followed(sb):
    r = await sb.run(
        ESCAPE + "os.remove('data.txt')\nos.symlink('/etc/hostname', 'data.txt')", files={"data.txt": b"1"}
    )
    assert r.files == {} and r.skipped_files == {"data.txt": "symbolic link (never followed)"}


@pytest.mark.skipif(not IS_ROOT, reason="making device nodes needs CAP_MKNOD")
def test_the_collector_never_opens_a_device(tmp_path):
    """No worker can make a device node (no CAP_MKNOD, scratch is nodev), so the
    collector meets one here, in a directory of the test's own."""
    out = tmp_path / "out"
    out.mkdir()
    os.mknod(out / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(out / "loop", stat.S_IFBLK | 0o600, os.makedev(7, 0))
    os.mkfifo(out / "fifo")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(out / "sock"))
        (out / "plain").write_bytes(b"p")
        collection = Collection(max_entries=10, max_bytes=100)
        collection.collect(str(tmp_path), {})
    assert collection.files == {"plain": b"p"}
    assert collection.skipped == {
        "fifo": "FIFO (never read)",
        "loop": "block device (never read)",
        "null": "character device (never read)",
        "sock": "socket (never read)",
    }


# --- the host's writer ---------------------------------------------------------------


def test_the_writer_refuses_paths_that_would_leave_its_directory(tmp_path):
    target = tmp_path / "results"
    outside = tmp_path / "outside"
    outside.mkdir()
    target.mkdir()
    (target / "link").symlink_to(outside)  # planted before the write, e.g. by an earlier run's output
    files = {
        "../../etc/x": b"climb",
        "/etc/x": b"absolute",
        "a/../../x": b"climb inside",
        "link/x": b"through a symlink",
        "link": b"onto the symlink",
        "ok/nested.txt": b"fine",
    }
    refused = write_files(target, files)
    assert set(refused) == {"../../etc/x", "/etc/x", "a/../../x", "link/x", "link"}
    assert "outside the output directory" in refused["../../etc/x"]
    assert os.listdir(outside) == []
    assert not (tmp_path.parent / "etc").exists()
    assert (target / "ok" / "nested.txt").read_bytes() == b"fine"
    assert (target / "link").is_symlink()


def test_sandbox_run_sends_files_and_writes_out_under_dir(tmp_path):
    source = tmp_path / "node.py"
    source.write_text("text = open('in/a.txt').read()\nopen('out/b.txt', 'w').write(text.upper())\n")
    (tmp_path / "a.txt").write_text("hello")
    result = subprocess.run(
        [
            *(sys.executable, "-m", "sandbox", "run", str(source)),
            *("--file", f"in/a.txt={tmp_path / 'a.txt'}", "--out", str(tmp_path / "results")),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "results" / "b.txt").read_text() == "HELLO"
    bad = subprocess.run(
        [sys.executable, "-m", "sandbox", "run", str(source), "--file", "../a.txt=" + str(tmp_path / "a.txt")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1 and "InputError: file path '../a.txt' must be relative" in bad.stderr


@in_module_loop
async def test_directories_past_the_walk_bounds_are_reported_not_walked(sb):
    code = ESCAPE + (
        "_path = 'out'\n"
        "for _ in range(40):\n"
        "    _path += '/d'\n"
        "    os.mkdir(_path)\n"
        "    open(_path + '/f', 'w').write('x')\n"
        "os.mkdir('out/long')\n"
        "os.chdir('out/long')\n"
        "for _ in range(17):\n"  # past 4096 bytes relative to out/, so made one level at a time
        "    os.mkdir('x' * 250)\n"
        "    os.chdir('x' * 250)\n"
        "open('far', 'w').write('far')\n"
    )
    r = await sb.run(code)
    walked = {"/".join(["d"] * depth) + "/f" for depth in range(1, MAX_DEPTH + 1)}
    assert set(r.files) == walked
    deep = "/".join(["d"] * (MAX_DEPTH + 1))
    assert r.skipped_files.pop(deep) == f"directory nested deeper than {MAX_DEPTH} levels under ./out/ (not walked)"
    [(where, reason)] = r.skipped_files.items()
    assert reason == "holds entries whose paths pass 4096 bytes" and where.startswith("long/" + "x" * 250)


@in_module_loop
async def test_a_path_that_is_not_valid_unicode_is_an_input_error(sb):
    with pytest.raises(InputError, match="must be relative"):
        await sb.run("x = 1", files={"bad\udcff": b"x"})


# --- stream() and sessions -------------------------------------------------------------


@in_module_loop
async def test_a_stream_takes_files_and_its_result_carries_what_came_out(sb):
    stream = sb.stream("print(open('in.txt').read())\nopen('out/echo.txt', 'w').write('echo')", files={"in.txt": b"hi"})
    printed = "".join([out.text async for out in stream])
    assert printed == "hi\n"
    assert stream.result.files == {"echo.txt": b"echo"}


@in_module_loop
async def test_a_session_keeps_its_files_and_returns_all_of_out_after_each_run(sb):
    async with sb.session() as session:
        first = await session.run("open('out/a.txt', 'w').write(open('in.txt').read())", files={"in.txt": b"one"})
        assert first.files == {"a.txt": b"one"}
        # The same input name again replaces the file; ./out/ still holds the first run's file.
        second = await session.run("open('out/b.txt', 'w').write(open('in.txt').read())", files={"in.txt": b"two"})
        assert second.files == {"a.txt": b"one", "b.txt": b"two"}
        streamed = session.stream("kept = open('in.txt').read()")
        assert [out async for out in streamed] == [] and streamed.result.outputs == {"kept": "two"}
    with pytest.raises(InputError, match=r"'\.\./x'"):
        async with sb.session() as session:
            await session.run("x = 1", files={"../x": b""})
