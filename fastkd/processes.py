"""How a fastkd process and the processes it forks live and end.

Schedulers and users stop jobs with SIGTERM (or kill -9). Two things must then hold: nothing
fastkd forked (datasets' tokenizing workers, the pip child) outlives it, blocked on a pipe, and a
stop outside the training loop (tokenizing, fine-tuning, loading) still ends in one line that says
what is kept and how to go on, not a bare exit status 143.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # what schedulers send before they kill a job


class Stopped(BaseException):
    """A stop signal arrived outside a loop with its own handler (which checkpoints first). Not an
    Exception, as KeyboardInterrupt is not: a library's `except Exception` must not swallow a stop."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(signum)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


def stopped_in(exc: BaseException | None) -> Stopped | None:
    """The Stopped behind `exc`, if any: a library's cleanup may raise its own error while a stop
    unwinds it (datasets' pool, asked for results in a finally, raises TimeoutError)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, Stopped):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def die_with_parent_hook():
    """A function that, run in a child, has the kernel kill it when its parent dies (Linux), or None.
    prctl is looked up here, in the parent: a child forked from a threaded process may only call it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG


_installed = False


def children_die_with_this_process() -> None:
    """Every process forked from here on (datasets.map's workers) is killed when its parent dies: a
    kill -9 of fastkd leaves no worker behind, blocked forever on the pipe to a dead parent."""
    global _installed
    hook = die_with_parent_hook()
    if _installed or hook is None:
        return
    _installed = True

    forking = [os.getpid()]

    def before_fork() -> None:
        forking[0] = os.getpid()  # (a forked child forking in turn is its own workers' parent)

    def in_child() -> None:
        hook()
        with contextlib.suppress(ValueError):  # a worker stops as workers do (Pool.terminate sends SIGTERM)
            for signum in STOP_SIGNALS:
                signal.signal(signum, signal.SIG_DFL)
        if os.getppid() != forking[0]:  # the parent died between fork() and prctl(): no signal will come
            os._exit(1)

    os.register_at_fork(before=before_fork, after_in_child=in_child)


def end_children(grace_s: float = 5.0) -> None:
    """Stop the processes this one started through multiprocessing (datasets' pool and its manager),
    which a stop may have cut off before their owner could shut them down: Python's exit would
    otherwise wait for them forever (a manager started as SIGTERM came has no finalizer yet)."""
    children = []
    for name in ("multiprocess", "multiprocessing"):
        module = sys.modules.get(name)
        if module is not None:
            children += module.active_children()
    for child in children:
        child.terminate()
    for child in children:
        child.join(grace_s)
        if child.is_alive():
            child.kill()
            child.join(grace_s)


def _raise_stopped(signum, _frame):
    signal.signal(signum, signal.SIG_DFL)  # a second one stops at once, as without fastkd's handler
    raise Stopped(signum)


_resending: list[threading.Timer] = []  # signals sent again after a swallowed Stopped (cancelled at the end)


def _deliver_again_if_swallowed(previous):
    """A sys.unraisablehook: where the handler ran inside code whose exceptions Python only reports
    (a fork hook, logging's lock release in datasets' pool start-up; a finalizer), the Stopped is
    lost. The signal is then sent again a moment later, to land in ordinary code."""
    def hook(unraisable):
        if isinstance(unraisable.exc_value, Stopped):
            signum = unraisable.exc_value.signum
            with contextlib.suppress(ValueError):  # (the first delivery set the default action; main thread only)
                signal.signal(signum, _raise_stopped)
            timer = threading.Timer(0.05, os.kill, (os.getpid(), signum))
            timer.daemon = True
            _resending.append(timer)
            timer.start()
            return
        previous(unraisable)
    return hook


@contextlib.contextmanager
def stop_signals_raise():
    """While a command runs outside a loop that handles them itself, SIGTERM and SIGUSR1 raise Stopped
    in the main thread, so the command unwinds (datasets' pool terminates its workers, staging folders
    are removed) and says what it kept. The training loop installs its own handlers and restores
    these after; the old ones come back at the end."""
    # Handlers only work in the main thread. A rank of several may wait in a collective, in C, where
    # no Python handler runs: there the default action (ending at once) stays, as before.
    if threading.current_thread() is not threading.main_thread() or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        yield
        return
    old = {signum: signal.signal(signum, _raise_stopped) for signum in STOP_SIGNALS}
    old_hook, sys.unraisablehook = sys.unraisablehook, _deliver_again_if_swallowed(sys.unraisablehook)
    try:
        yield
    finally:
        while _resending:  # (a command that ended meanwhile must not be killed by the signal sent again)
            _resending.pop().cancel()
        sys.unraisablehook = old_hook
        for signum, handler in old.items():
            signal.signal(signum, handler)
