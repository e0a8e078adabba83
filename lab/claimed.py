"""What a lab and a cluster share about their life: a claimed name (cleanup.claim), a place
among what is open (closed at exit, and SIGTERM/SIGHUP unwind `with` blocks), and a teardown
that runs every step and reports all errors at the end."""

from __future__ import annotations

import atexit
import signal
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Self

from lab import cleanup

_open: list[Claimed] = []


class Claimed:
    """Base of Lab and Cluster: `with X(...) as x:` opens it and always closes it. A subclass
    names its kind (for messages), builds itself in _build() and lists _teardown_steps()."""

    kind = "lab"
    name: str
    _lock_fd: int | None = None

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:
        self._lock_fd = cleanup.claim(self.name)
        if self._lock_fd is None:
            raise RuntimeError(
                f"{self.kind} {self.name}: a running lab has this name; pick another")
        _open.append(self)
        _install_exit_paths()
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Run every teardown step and release the name. Idempotent; keeps going on errors
        and reports them all at the end."""
        if self._lock_fd is None:
            return  # never opened (or already closed): nothing here is ours to remove
        errors: list[BaseException] = []
        for step in self._teardown_steps():
            try:
                step()
            except Exception as error:  # noqa: BLE001 - the rest must still be removed
                errors.append(error)
        cleanup.release(self.name, self._lock_fd)
        self._lock_fd = None
        if self in _open:
            _open.remove(self)
        if errors:
            raise RuntimeError(f"{self.kind} {self.name}: teardown incomplete: {errors}")

    def _build(self) -> None:
        raise NotImplementedError

    def _teardown_steps(self) -> Iterable[Callable[[], object]]:
        raise NotImplementedError


def _close_all_open() -> None:
    # Newest first, as separate atexit hooks would: a cluster's nodes, then the cluster.
    for opened in reversed(_open.copy()):
        try:
            opened.close()
        except Exception as error:  # noqa: BLE001 - at exit, try every one
            print(f"{opened.kind} {opened.name}: {error}", file=sys.stderr)


def _interrupt(signum, _frame) -> None:
    # SIGTERM acts like Ctrl-C: `with Lab(...)` blocks and fixtures unwind and clean up, and
    # pytest stops (it would record a SystemExit as one failed test and carry on).
    raise KeyboardInterrupt(f"signal {signum}")


_exit_paths_installed = False


def _install_exit_paths() -> None:
    global _exit_paths_installed
    if _exit_paths_installed:
        return
    _exit_paths_installed = True
    atexit.register(_close_all_open)
    is_main = threading.current_thread() is threading.main_thread()
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if is_main and signal.getsignal(signum) == signal.SIG_DFL:
            signal.signal(signum, _interrupt)
