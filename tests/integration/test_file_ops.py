"""File ops (read_file, write_file, stat, list, archive) and path
confinement against every kind of escape."""
from __future__ import annotations

import hashlib
import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from slotwire import Client


def ws(client: Client, slot: int = 0) -> Path:
    return Path(client.call("slots", {"slot": slot})["slots"][0]["workspace"])


def test_write_read_round_trip_and_sha(client: Client) -> None:
    data = os.urandom(5 << 20)
    r = client.call("write_file", {"slot": 0, "path": "big.bin", "data": data})
    assert r["size"] == len(data) and r["sha256"] == hashlib.sha256(data).hexdigest()
    r = client.call("read_file", {"slot": 0, "path": "big.bin", "sha256": True})
    assert r["data"] == data and r["eof"] and r["size"] == len(data)
    assert r["sha256"] == hashlib.sha256(data).hexdigest()
    assert (ws(client) / "big.bin").read_bytes() == data


def test_ranges_eof_mode_and_mkdirs(client: Client) -> None:
    assert client.error_code("write_file", {"slot": 0, "path": "a/b/c.txt",
                                            "data": b"x"}) == "not_found"
    client.call("write_file", {"slot": 0, "path": "a/b/c.txt", "data": b"0123456789",
                               "mkdirs": True, "mode": 0o600})
    r = client.call("read_file", {"slot": 0, "path": "a/b/c.txt", "offset": 2, "length": 3})
    assert (r["data"], r["eof"], r["offset"], r["size"]) == (b"234", False, 2, 10)
    r = client.call("read_file", {"slot": 0, "path": "a/b/c.txt", "offset": 8, "length": 100})
    assert (r["data"], r["eof"]) == (b"89", True)
    r = client.call("read_file", {"slot": 0, "path": "a/b/c.txt", "offset": 50})
    assert (r["data"], r["eof"]) == (b"", True)
    assert r["mode"] == 0o600
    assert client.error_code("read_file", {"slot": 0, "path": "a"}) == "bad_request"
    assert client.error_code("read_file", {"slot": 0, "path": "missing"}) == "not_found"
    assert client.error_code("write_file", {"slot": 0, "path": "a", "data": b"x"}) == "exists"


def test_append_and_atomic_replace_leave_no_temp_files(client: Client) -> None:
    for part in (b"one\n", b"two\n"):
        client.call("write_file", {"slot": 0, "path": "log", "data": part, "append": True})
    assert client.call("read_file", {"slot": 0, "path": "log"})["data"] == b"one\ntwo\n"
    for i in range(20):
        client.call("write_file", {"slot": 0, "path": "f", "data": str(i).encode()})
    assert sorted(os.listdir(ws(client))) == ["f", "log"]
    assert client.call("read_file", {"slot": 0, "path": "f"})["data"] == b"19"


def test_too_large_read_says_how_to_range(agent_factory) -> None:
    a = agent_factory(extra=["--max-frame", "1048576"])
    c = a.client()
    (ws(c) / "big").write_bytes(b"\0" * (2 << 20))
    r = c.call_raw("read_file", {"slot": 0, "path": "big"})
    assert r["error"]["code"] == "too_large" and "offset" in r["error"]["message"]
    assert len(c.call("read_file", {"slot": 0, "path": "big", "length": 500000})["data"]) == 500000


@pytest.mark.parametrize("path", [
    "../x", "a/../../x", "/etc/passwd", "..", "./../../../../etc/shadow",
])
def test_dotdot_and_absolute_escape(client: Client, path: str) -> None:
    (ws(client) / "a").mkdir(exist_ok=True)
    for op, extra in (("read_file", {}), ("write_file", {"data": b"x"}), ("stat", {}),
                      ("list", {}), ("archive", {})):
        code = client.error_code(op, {"slot": 0, "path": path, **extra})
        assert code in ("path_escape", "bad_request"), (op, path, code)


def test_symlink_escapes(client: Client) -> None:
    w0, w1 = ws(client, 0), ws(client, 1)
    (w1 / "secret").write_text("other slot")
    (w0 / "etc").symlink_to("/etc")
    (w0 / "other").symlink_to(w1)
    (w0 / "rel").symlink_to("../../1/work")
    (w0 / "loop").symlink_to("loop")
    (w0 / "d").mkdir()
    (w0 / "d" / "up").symlink_to("../..")
    for p in ("etc/passwd", "other/secret", "rel/secret", "loop", "d/up/x", "loop/x"):
        for op, extra in (("read_file", {}), ("write_file", {"data": b"x"}),
                          ("list", {}), ("archive", {})):
            if op in ("write_file", "archive") and p == "loop":
                continue  # a final symlink is replaced or archived as a link, never followed
            code = client.error_code(op, {"slot": 0, "path": p, **extra})
            assert code in ("path_escape", "not_found"), (op, p, code)
            assert code == "path_escape" or op == "write_file", (op, p, code)
    assert (w1 / "secret").read_text() == "other slot"
    assert not Path("/etc/x").exists()


def test_symlinks_inside_are_followed_and_final_link_replaced(client: Client) -> None:
    w = ws(client)
    (w / "real").write_bytes(b"inside")
    (w / "link").symlink_to("real")
    assert client.call("read_file", {"slot": 0, "path": "link"})["data"] == b"inside"
    st = client.call("stat", {"slot": 0, "path": "link"})
    assert st["type"] == "symlink" and st["target"] == "real"
    (w / "out").symlink_to("/tmp/slot-should-not-exist")
    client.call("write_file", {"slot": 0, "path": "out", "data": b"replaced"})
    assert not (w / "out").is_symlink() and (w / "out").read_bytes() == b"replaced"
    assert not Path("/tmp/slot-should-not-exist").exists()


def test_nul_and_long_paths(client: Client) -> None:
    assert client.error_code("read_file", {"slot": 0, "path": "a\0b"}) == "bad_request"
    assert client.error_code("read_file", {"slot": 0, "path": "a" * 5000}) == "bad_request"
    assert client.error_code("write_file", {"slot": 0, "path": "", "data": b""}) == "bad_request"


def test_stat_and_list(client: Client) -> None:
    w = ws(client)
    (w / "b").mkdir()
    (w / "b" / "z.txt").write_text("zz")
    (w / "a.txt").write_text("a")
    (w / "c").symlink_to("b")
    r = client.call("stat", {"slot": 0, "path": "b/z.txt"})
    assert (r["type"], r["size"]) == ("file", 2)
    assert client.call("stat", {"slot": 0, "path": "."})["type"] == "dir"
    assert client.error_code("stat", {"slot": 0, "path": "nope"}) == "not_found"
    r = client.call("list", {"slot": 0})
    assert [e["path"] for e in r["entries"]] == ["a.txt", "b", "c"]
    assert [e["type"] for e in r["entries"]] == ["file", "dir", "symlink"]
    r = client.call("list", {"slot": 0, "recursive": True})
    assert [e["path"] for e in r["entries"]] == ["a.txt", "b", "b/z.txt", "c"]  # c not followed
    assert r["truncated"] is False
    r = client.call("list", {"slot": 0, "recursive": True, "max_entries": 2})
    assert r["truncated"] is True and len(r["entries"]) == 2
    assert client.error_code("list", {"slot": 0, "path": "a.txt"}) == "bad_request"


def test_archive_tar_and_targz_are_real_archives(client: Client, tmp_path: Path) -> None:
    w = ws(client)
    (w / "src").mkdir()
    (w / "src" / "main.py").write_text("print(1)\n")
    long_name = "n" * 150
    (w / "src" / long_name).write_bytes(os.urandom(3000))
    (w / "src" / "link").symlink_to("main.py")
    for fmt, mode in (("tar", "r:"), ("tar.gz", "r:gz")):
        r = client.call("archive", {"slot": 0, "path": "src", "format": fmt})
        assert r["format"] == fmt and r["entries"] == 4 and r["bytes"] == len(r["data"])
        tf = tarfile.open(fileobj=io.BytesIO(r["data"]), mode=mode)
        names = sorted(m.name.rstrip("/") for m in tf.getmembers())
        assert names == sorted([".", "./link", "./main.py", "./" + long_name])
        assert tf.extractfile("./" + long_name).read() == (w / "src" / long_name).read_bytes()
        assert tf.getmember("./link").issym() and tf.getmember("./link").linkname == "main.py"
        out = tmp_path / f"a.{fmt}"
        out.write_bytes(r["data"])
        listing = subprocess.run(["tar", "-tf", str(out)], capture_output=True, text=True,
                                 check=True).stdout.split()
        assert "./main.py" in listing and "./" + long_name in listing
    r = client.call("archive", {"slot": 0, "path": "src/main.py", "format": "tar"})
    assert tarfile.open(fileobj=io.BytesIO(r["data"])).getnames() == ["main.py"]


def test_archive_limits(client: Client) -> None:
    w = ws(client)
    for i in range(10):
        (w / f"f{i}").write_bytes(os.urandom(10000))
    assert client.error_code("archive", {"slot": 0, "max_entries": 5}) == "too_large"
    assert client.error_code("archive", {"slot": 0, "max_bytes": 5000}) == "too_large"
    assert client.error_code("archive", {"slot": 0, "format": "zip"}) == "bad_request"
    assert client.call("archive", {"slot": 0})["entries"] == 11


def test_fallback_walk_without_openat2(agent_factory, monkeypatch) -> None:
    """The component walk used on kernels without openat2: same answers for
    escapes, and stricter (refuses symlinks that stay inside too)."""
    monkeypatch.setenv("SLOT_AGENT_NO_OPENAT2", "1")
    a = agent_factory()
    c = a.client()
    w = ws(c)
    (w / "d").mkdir()
    (w / "d" / "f").write_bytes(b"ok")
    (w / "out").symlink_to("/etc")
    (w / "in").symlink_to("d")
    (w / "file").write_bytes(b"x")
    assert c.call("read_file", {"slot": 0, "path": "d/../d/./f"})["data"] == b"ok"
    for p in ("../x", "d/../../x", "out/passwd", "in/f", "out"):
        assert c.error_code("read_file", {"slot": 0, "path": p}) == "path_escape", p
    assert c.error_code("read_file", {"slot": 0, "path": "file/x"}) == "not_found"
    assert c.error_code("read_file", {"slot": 0, "path": "nope/x"}) == "not_found"
    c.call("write_file", {"slot": 0, "path": "n/e/w", "data": b"1", "mkdirs": True})
    assert (w / "n" / "e" / "w").read_bytes() == b"1"
    assert c.call("list", {"slot": 0, "path": "d"})["entries"][0]["path"] == "f"
    assert c.error_code("list", {"slot": 0, "path": "out"}) == "path_escape"
