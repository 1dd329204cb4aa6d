"""The console of `r4b run`: one line per task, the stages' own progress, the full log in a file.

kfp.local prints everything to stdout: its orchestrator's log lines, every task's executor input
as indented JSON, the task's outputs, and the task subprocess's own output (~970 lines for the tiny
run). `RunConsole.capture()` takes over `sys.stdout`/`sys.stderr` while the pipeline runs, writes
every line unchanged to `log_path`, and shows on the terminal only

    ▶ anneal                                  when a task starts
      data: 768 samples (617 think / ...)      what our stages print (progress lines as a rich bar
                                               on a terminal, or every ~20 s when piped)
      warning lines (ours and libraries')
    ✓ anneal  71.4 s                            when it ends (✗ and its last lines when it fails)

With `verbose=True` every line goes to the terminal as well (KFP's own view).

    console = RunConsole(log_path, labels={"evaluate": "eval annealed"})
    with console.capture():
        pipeline(...)
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# kfp.local's orchestrator lines: "01:49:30.152 - INFO - Executing task 'prepare'"
ORCH = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} - (\w+) - (.*)$")
TASK_START = re.compile(r"^Executing task '([^']+)'")
TASK_END = re.compile(r"^Task '([^']+)' finished with status (\w+)")
TASK_OUTPUTS = re.compile(r"^Task '([^']+)' outputs:")
# Inside a task: "[KFP Executor 2026-11-26 01:49:30,208 INFO]: message"
EXECUTOR = re.compile(r"^\[KFP Executor [^\]]* (\w+)\]: ?(.*)$")
PY_WARNING = re.compile(r"^\S+\.py:\d+: \w*Warning: ")
# Library chatter that says nothing about the run: HF weight-loading bars, torchrun's OMP banner,
# MLflow's INFO lines and its run links.
NOISE = (re.compile(r"^Loading weights:"), re.compile(r"^\*{10,}$"), re.compile(r"^Setting OMP_NUM_THREADS"),
         re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d INFO "), re.compile(r"^(🏃 View run|🧪 View experiment) "),
         re.compile(r"^warnings\.warn\(|^_warn_local_only_noops\("))
# Our stages' progress: "step 5/300 ...", "bpo step 3/20 ...", "curate: 64/800 items ...".
PROGRESS = re.compile(r"\b(?:step|steps)\s+(\d+)/(\d+)\b|\b(\d+)/(\d+) items\b")
PLAIN_PROGRESS_EVERY_S = 20.0
TAIL_LINES = 40


class _Sink(io.TextIOBase):
    """A text stream that hands complete lines to `RunConsole.feed` (what kfp and its tasks print)."""

    def __init__(self, console: RunConsole) -> None:
        self._console = console
        self._buf = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with self._console.lock:
            self._buf += text
            *lines, self._buf = self._buf.split("\n")
            for line in lines:
                self._console.feed(line)
        return len(text)

    def flush(self) -> None:
        self._console.flush_log()

    def isatty(self) -> bool:
        return False

    def close_buffer(self) -> None:
        if self._buf:
            self._console.feed(self._buf)
            self._buf = ""


class RunConsole:
    """Filters kfp.local's output for people; keeps all of it in `log_path`."""

    def __init__(self, log_path: Path, labels: dict[str, str] | None = None, verbose: bool = False,
                 stream=None) -> None:
        from rich.console import Console

        self.log_path = Path(log_path)
        self.labels = labels or {}
        self.verbose = verbose
        self.lock = threading.RLock()
        self.out = Console(file=stream or sys.stdout, highlight=False, soft_wrap=True)
        self.live = self.out.is_terminal and not verbose
        self.tasks: list[dict] = []  # {"name", "label", "status", "seconds"} in start order
        self.shown = 0  # lines put on the console (for tests and the summary)
        self._task: dict | None = None
        self._skip_json = False  # inside "Got executor_input:" JSON
        self._skip_outputs = False  # inside "Task 'x' outputs:" block
        self._skip_next = False  # the source line a Python warning prints after itself
        self._tail: deque[tuple[str, bool]] = deque(maxlen=TAIL_LINES)  # (line, shown above)
        self._last_progress_print = 0.0
        self._progress = None
        self._bar = None
        self._log = None

    # -- lifecycle -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def capture(self) -> Iterator[RunConsole]:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "a", encoding="utf-8", errors="replace")
        sink = _Sink(self)
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=30),
                                      MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.fields[detail]}"),
                                      console=self.out, transient=True, redirect_stdout=False,
                                      redirect_stderr=False)
            self._progress.start()
        old_out, old_err = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = sink
        try:
            yield self
        finally:
            sys.stdout, sys.stderr = old_out, old_err
            with self.lock:
                sink.close_buffer()
                if self._task is not None:  # the run broke off inside a task
                    self._end_task(self._task["name"], "FAILURE")
                if self._progress is not None:
                    self._progress.stop()
                self._log.close()

    def flush_log(self) -> None:
        if self._log is not None:
            self._log.flush()

    # -- output --------------------------------------------------------------------------------
    def _show(self, text: str, style: str | None = None) -> None:
        self.shown += 1
        target = self._progress.console if self._progress is not None else self.out
        target.print(text, style=style, markup=False)

    def feed(self, raw: str) -> None:
        """One line of kfp.local output: log it, then decide what the console shows."""
        self._log.write(raw + "\n")
        line = ANSI.sub("", raw).rstrip()
        if self.verbose:
            self.out.file.write(raw + "\n")
            self.out.file.flush()
            self.shown += 1
            self._track_tasks(line)
            return
        m = ORCH.match(line)
        if m:
            self._skip_outputs = False
            level, message = m.groups()
            if self._track_tasks(line):
                return
            if TASK_OUTPUTS.match(message):
                self._skip_outputs = True  # artifacts and URIs; the task's return value is kept
            elif level in ("WARNING", "ERROR", "CRITICAL"):
                self._show(f"  {level.lower()}: {message}", "yellow")
            return
        if re.fullmatch(r"-{20,}", line):
            self._skip_outputs = False
            return
        if self._skip_outputs:
            out = re.match(r"^    Output: '(.*)'$", line)
            if out and self.tasks:
                self.tasks[-1]["output"] = out.group(1)
            return
        if self._skip_next:
            self._skip_next = False
            return
        if PY_WARNING.match(line.strip()):
            self._skip_next = True  # Python prints the offending source line next
            return
        self._task_line(line[4:] if line.startswith("    ") else line.strip())

    def _track_tasks(self, line: str) -> bool:
        m = ORCH.match(line)
        if not m:
            return False
        message = m.group(2)
        start, end = TASK_START.match(message), TASK_END.match(message)
        if start:
            self._start_task(start.group(1))
        elif end:
            self._end_task(end.group(1), end.group(2))
        return bool(start or end) or message.startswith(("Running pipeline", "Pipeline ", "Streamed logs"))

    def _task_line(self, line: str) -> None:
        if self._skip_json:
            if line == "}":
                self._skip_json = False
            return
        m = EXECUTOR.match(line)
        if m:
            level, message = m.groups()
            if message.startswith("Got executor_input"):
                self._skip_json = True
            elif level in ("WARNING", "ERROR", "CRITICAL"):
                self._tail.append((message, True))
                self._show(f"  {message}", "yellow")
            return
        if not line.strip() or any(p.search(line) for p in NOISE):
            return
        p = PROGRESS.search(line)
        if p:
            done, total = (int(x) for x in (p.group(1) or p.group(3), p.group(2) or p.group(4)))
            self._tail.append((line, self._update_progress(line, done, total)))
            return
        self._tail.append((line, True))
        self._show(f"  {line}")

    def _update_progress(self, line: str, done: int, total: int) -> bool:
        """A bar on a terminal; else the line every PLAIN_PROGRESS_EVERY_S and at the end. True if printed."""
        if self._progress is not None and self._bar is not None:
            self._progress.update(self._bar, completed=done, total=total, detail=line[:70])
            return False
        now = time.monotonic()
        if done >= total or now - self._last_progress_print >= PLAIN_PROGRESS_EVERY_S:
            self._last_progress_print = now
            self._show(f"  {line}")
            return True
        return False

    # -- tasks ---------------------------------------------------------------------------------
    def _start_task(self, name: str) -> None:
        label = self.labels.get(name, name)
        self._task = {"name": name, "label": label, "status": "RUNNING", "seconds": None,
                      "t0": time.monotonic()}
        self.tasks.append(self._task)
        self._tail.clear()
        self._skip_json = False
        self._last_progress_print = time.monotonic()
        if self.verbose:
            return
        if self._progress is not None:
            self._bar = self._progress.add_task(label, total=None, detail="")
        self._show(f"▶ {label}", "bold")

    def _end_task(self, name: str, status: str) -> None:
        task = self._task if self._task is not None and self._task["name"] == name else None
        if task is None:
            return
        task["status"] = status
        task["seconds"] = round(time.monotonic() - task.pop("t0"), 1)
        self._task = None
        if self._bar is not None:
            self._progress.remove_task(self._bar)
            self._bar = None
        if self.verbose:
            return
        if status == "SUCCESS":
            self._show(f"✓ {task['label']}  {task['seconds']:.1f} s", "green")
        elif all(shown for _, shown in self._tail):
            self._show(f"✗ {task['label']}  {status.lower()} after {task['seconds']:.1f} s (its output is above)", "red")
        else:  # some of its last lines were hidden (progress, executor logs): all of them, in order
            self._show(f"✗ {task['label']}  {status.lower()} after {task['seconds']:.1f} s; its last lines:", "red")
            for line, _ in self._tail:
                self._show(f"    {line}")
