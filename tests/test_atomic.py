"""``bitnet_torch._atomic.atomic_directory``: a directory replaced as a whole, or not at all."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bitnet_torch import _atomic
from bitnet_torch._atomic import atomic_directory


def _tree(root) -> dict[str, str]:
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            out[os.path.relpath(path, root)] = open(path).read()
    return out


def _write(folder, **files) -> None:
    for name, text in files.items():
        with open(os.path.join(folder, name), "w") as handle:
            handle.write(text)


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_existing_directory_is_replaced_keeping_other_entries(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(_atomic, "_exchange", lambda a, b: False)  # the path taken where renameat2 is missing
    target = tmp_path / "out"
    (target / "sub").mkdir(parents=True)
    _write(target, **{"config.json": "old", "model.safetensors": "old weights", "keep.txt": "kept"})
    _write(target / "sub", **{"state.json": "nested"})
    os.symlink("keep.txt", target / "link")
    with atomic_directory(target, drop_old=lambda name: name.startswith("model")) as partial:
        _write(partial, **{"config.json": "new", "model-00001-of-00001.safetensors": "new weights"})
        assert _tree(target)["config.json"] == "old", "the target must not change before the block ends"
    assert _tree(target) == {"config.json": "new", "model-00001-of-00001.safetensors": "new weights",
                             "keep.txt": "kept", "sub/state.json": "nested", "link": "kept"}
    assert os.path.islink(target / "link")
    assert os.listdir(tmp_path) == ["out"]


def test_failure_inside_the_block_leaves_target_and_no_temporary(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    _write(target, **{"config.json": "old"})
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(target) as partial:
            _write(partial, **{"config.json": "new"})
            raise RuntimeError("boom")
    assert _tree(target) == {"config.json": "old"}
    assert os.listdir(tmp_path) == ["out"]
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "fresh"):
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == ["out"]


def test_new_directory_gets_ordinary_permissions_and_symlinked_targets_are_followed(tmp_path):
    with atomic_directory(tmp_path / "new") as partial:
        _write(partial, **{"a": "1"})
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(tmp_path / "new").st_mode & 0o777 == 0o777 & ~umask
    os.symlink(tmp_path / "new", tmp_path / "alias")
    with atomic_directory(tmp_path / "alias") as partial:
        _write(partial, **{"a": "2"})
    assert os.path.islink(tmp_path / "alias") and _tree(tmp_path / "new") == {"a": "2"}


def test_a_file_target_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError):
        with atomic_directory(tmp_path / "f"):
            pass
    assert (tmp_path / "f").read_text() == "x"


def test_only_leftovers_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    (tmp_path / f".out.partial-{dead_pid}-abc").mkdir()
    (tmp_path / f".out.partial-{os.getppid()}-xyz").mkdir()  # a live process (our parent) may still be writing
    (tmp_path / f".other.partial-{dead_pid}-abc").mkdir()  # another target's: not ours to judge here
    with atomic_directory(tmp_path / "out") as partial:
        _write(partial, **{"a": "1"})
    assert sorted(os.listdir(tmp_path)) == sorted([f".out.partial-{os.getppid()}-xyz", f".other.partial-{dead_pid}-abc", "out"])
