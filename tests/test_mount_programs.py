"""Real programs on the mount: git with symlinks, a Python venv, `sed -i` on one
mount while another mount reads the file.  Real host and guest processes; the
programs are the system's own."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from tests.test_mount import MountedGuest
from tests.test_mount_posix import _sh

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


@pytest.fixture
def two_mounts(export, start_host):
    _, address = start_host(export, "--detector", "none")
    base = tempfile.mkdtemp(prefix="cleanlease-mounts.", dir="/tmp")
    guests = [MountedGuest(address, os.path.join(base, name), name) for name in ("a", "b")]
    try:
        yield [g.mountpoint for g in guests]
    finally:
        for g in guests:
            g.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_git_clone_of_a_repository_with_symlinks_then_status_and_fsck(tmp_path, two_mounts):
    src = tmp_path / "src"
    _sh(f"git init -q {src} && cd {src} && echo hi > a && ln -s a link && mkdir d && "
        "ln -s ../a d/up && chmod +x a && git add -A && "
        "git -c user.email=t@t -c user.name=t commit -qm one")
    a, b = two_mounts
    _sh(f"git clone -q {src} {a}/clone")
    assert _sh(f"cd {a}/clone && git status --porcelain") == ""
    _sh(f"cd {a}/clone && git fsck --full 2>&1")
    # The other mount sees the same tree, symlinks as symlinks.
    assert os.readlink(f"{b}/clone/d/up") == "../a" and os.readlink(f"{b}/clone/link") == "a"
    assert _sh(f"cd {b}/clone && git status --porcelain") == ""


def test_python_venv_on_the_mount_runs_its_python(two_mounts):
    a, _ = two_mounts
    _sh(f"{sys.executable} -m venv --without-pip {a}/venv")
    out = _sh(f"{a}/venv/bin/python -c 'import sys; print(sys.prefix)'")
    assert out.strip() == f"{a}/venv"


def test_sed_i_on_one_mount_is_seen_whole_by_the_other_at_once(two_mounts):
    """sed -i writes a new file and renames it over the old name: the rename
    recalls the other mount's entry before it lands, so once sed has returned
    the other mount reads the new file, whole, at once; before, the old one."""
    a, b = two_mounts
    lines = "".join(f"line {i} v0\n" for i in range(200))
    with open(f"{a}/text", "w") as f:
        f.write(lines)
    for round_ in range(1, 6):
        with open(f"{b}/text") as f:
            assert f.read() == lines.replace("v0", f"v{round_ - 1}")  # cached by b now
        _sh(f"sed -i 's/v{round_ - 1}$/v{round_}/' {a}/text")
        with open(f"{b}/text") as f:
            assert f.read() == lines.replace("v0", f"v{round_}"), round_
