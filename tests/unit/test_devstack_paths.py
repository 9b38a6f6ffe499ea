"""Where `make run` keeps its state: in the checkout, unless PostgreSQL's OS user cannot enter it."""

from __future__ import annotations

import os
import pwd
import tempfile
from pathlib import Path

import pytest

from reactor import devstack


def _postgres_user_exists() -> bool:
    try:
        pwd.getpwnam(os.environ.get("REACTOR_PG_OS_USER", "postgres"))
    except KeyError:
        return False
    return True


needs_root_and_postgres = pytest.mark.skipif(
    os.geteuid() != 0 or not _postgres_user_exists(), reason="only as root, with a postgres OS user"
)


@needs_root_and_postgres
def test_a_checkout_postgres_can_enter_keeps_its_state_inside(monkeypatch: pytest.MonkeyPatch) -> None:
    # (pytest's own tmp_path sits under a directory only root may enter)
    parent = Path(tempfile.mkdtemp())
    try:
        parent.chmod(0o755)
        (parent / "checkout").mkdir()
        monkeypatch.setattr(devstack, "REPO_ROOT", parent / "checkout")
        assert devstack.DevStack.from_env({}).root == parent / "checkout" / ".stack"
    finally:
        (parent / "checkout").rmdir()
        parent.rmdir()


@needs_root_and_postgres
def test_a_private_checkout_keeps_its_state_in_a_directory_of_its_own_under_var_tmp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a clone under a directory only root may enter (as `mktemp -d` makes)
    tmp_path.chmod(0o700)
    (tmp_path / "checkout").mkdir()
    monkeypatch.setattr(devstack, "REPO_ROOT", tmp_path / "checkout")
    # Then the state goes where PostgreSQL can reach it, the same place every time
    root = devstack.DevStack.from_env({}).root
    assert str(root.parent) == "/var/tmp"  # noqa: S108 - comparing a path, not using it
    assert root.name.startswith("reactor-stack-")
    assert devstack.DevStack.from_env({}).root == root
    # And an explicit setting still wins
    assert devstack.DevStack.from_env({"REACTOR_DEV_STACK_DIR": str(tmp_path / "s")}).root == tmp_path / "s"
