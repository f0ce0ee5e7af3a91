"""Interrupt a call at a chosen point of the library's own code: the n-th line (or bytecode) that
runs in ``rlsedit_llm``.

``Injector(at=None)`` only counts the points a call passes; ``Injector(at=n)`` fires at the n-th:

- ``kind="signal"``: a real ``SIGINT`` is raised there (``signal.raise_signal``), so whatever
  handler is installed at that moment decides, exactly as for Ctrl-C: Python's default handler
  raises ``KeyboardInterrupt`` at that point, the library's deferral records it;
- ``kind="exception"``: :class:`Injected` is raised there, whatever the code is doing (the model
  of an allocation failure or any other error at that point).

A trace function that raises stops tracing, so each run injects once.

Two kinds of point are left out, because Python itself cannot raise an exception there (signals
are handled only at its "eval breaker" checks) while one injected there would escape the code's
own handlers: the line event Python reports when a ``with`` block ends, just before it calls the
context manager's ``__exit__`` (an exception there would skip the ``__exit__``, a lock would stay
held), and a ``NOP`` (the ``try:`` line compiles to one that the exception table may leave
uncovered; the next instruction is a point of its own). And ``kind="exception"`` leaves out
``rlsedit_llm/interrupts.py``: it only swaps signal handlers, where the one exception Python can
raise is a signal's, which ``kind="signal"`` covers there; and ``finally:`` blocks with what they
call (clean-up: an exception raised there is a second fault that no code can absorb; the library
defers signals for a whole call, so Ctrl-C never lands there).
"""

from __future__ import annotations

import ast
import dis
import signal
import sys
from pathlib import Path

import rlsedit_llm

PACKAGE = str(Path(rlsedit_llm.__file__).resolve().parent)
SIGNAL_ONLY = str(Path(PACKAGE) / "interrupts.py")


def _skipped(code) -> frozenset:
    """Offsets of the ``NOP`` instructions and of the sequences that call a ``with`` block's
    ``__exit__(None, None, None)`` (see the module docstring)."""
    ops = list(dis.get_instructions(code))
    starts = {op.offset for op in ops if op.opname == "NOP"}
    for k in range(len(ops) - 3):
        if all(op.opname == "LOAD_CONST" and op.argval is None for op in ops[k:k + 3]):
            call = next((op for op in ops[k + 3:k + 5] if op.opname == "CALL"), None)
            if call is not None and call.arg == 2:
                starts.add(ops[k].offset)
    return frozenset(starts)


def _finally_lines(filename: str) -> frozenset:
    """The line numbers inside the ``finally:`` blocks of a source file."""
    with open(filename, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    lines = set()
    for node in ast.walk(tree):
        for stmt in getattr(node, "finalbody", ()):
            lines.update(range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1))
    return frozenset(lines)


class Injected(Exception):
    """The exception :class:`Injector` raises."""


class Injector:
    def __init__(self, at: int | None = None, *, kind: str = "exception", opcodes: bool = False,
                 files: tuple[str, ...] = ()):
        assert kind in ("exception", "signal")
        self.at, self.kind, self.opcodes = at, kind, opcodes
        self.files = tuple(str(Path(PACKAGE) / f) for f in files)  # only these (relative paths), if given
        self.count = 0
        self.points: list[tuple[str, int]] = []  # (file relative to the package, line) per point, when counting
        self.functions: list[str] = []  # the qualified name of the function of each point
        self.cleanup: set[int] = set()  # points in clean-up code (kind="exception": left out)
        self.fired_in: str | None = None  # "file:line" where it fired
        self._exits: dict = {}  # code object -> offsets of the points left out
        self._finally: dict = {}  # file -> lines of its finally blocks
        self._caller = None

    def _traced(self, filename: str) -> bool:
        if self.kind == "exception" and filename == SIGNAL_ONLY:
            return False
        if self.files:
            return filename in self.files
        return filename.startswith(PACKAGE)

    def _global(self, frame, event, arg):
        if not self._traced(frame.f_code.co_filename):
            return None
        if self.opcodes:
            frame.f_trace_lines = False
            frame.f_trace_opcodes = True
        return self._local

    def _in_cleanup(self, frame) -> bool:
        """Whether this frame or a caller in the package is running a ``finally:`` block."""
        while frame is not None and frame is not self._caller:
            filename = frame.f_code.co_filename
            if filename.startswith(PACKAGE):
                if filename not in self._finally:
                    self._finally[filename] = _finally_lines(filename)
                if frame.f_lineno in self._finally[filename]:
                    return True
            frame = frame.f_back
        return False

    def _local(self, frame, event, arg):
        if event in ("line", "opcode"):
            code = frame.f_code
            if code not in self._exits:
                self._exits[code] = _skipped(code)
            if frame.f_lasti in self._exits[code]:
                return self._local
            if self.at is None:
                self.points.append((frame.f_code.co_filename[len(PACKAGE) + 1:], frame.f_lineno))
                self.functions.append(getattr(frame.f_code, "co_qualname", frame.f_code.co_name))  # 3.11+: qualified
                if self.kind == "exception" and self._in_cleanup(frame):  # counted, never chosen
                    self.cleanup.add(len(self.points) - 1)
            elif self.fired_in is None and self.count == self.at:
                self.fired_in = f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}"
                if self.kind == "signal":
                    signal.raise_signal(signal.SIGINT)
                else:
                    raise Injected(f"injected at point {self.at} ({self.fired_in})")
            self.count += 1
        return self._local

    def selection(self, critical: tuple[str, ...], *, within: tuple[str, ...] | None = None) -> list[int]:
        """After a counting run: every point in the ``critical`` files, and elsewhere (in the
        ``within`` files, if given) the first and the last time each line ran (a loop's body is
        interrupted on its first and last pass). Points in clean-up code are left out."""
        first: dict[tuple[str, int], int] = {}
        last: dict[tuple[str, int], int] = {}
        chosen = set()
        for i, (file, line) in enumerate(self.points):
            if file in critical:
                chosen.add(i)
            elif within is not None and file not in within:
                continue
            first.setdefault((file, line), i)
            last[(file, line)] = i
        return sorted((chosen | set(first.values()) | set(last.values())) - self.cleanup)

    def __enter__(self) -> Injector:
        self._caller = sys._getframe(1)  # frames from here up are the test's: not walked
        sys.settrace(self._global)
        return self

    def __exit__(self, *exc) -> bool:
        sys.settrace(None)
        return False
