"""``cordvoice bench``: reproducible performance figures for cordvoice, measured side by side.

Each benchmark is a module with a ``run_*`` function that returns a JSON-ready dict; the command line
(:mod:`cordvoice.commands.bench`) prints it. The pieces they share:

* :mod:`~cordvoice.bench.machine`: the machine description every result carries, process CPU and RSS
  readings, and core placement (``os.sched_setaffinity``).
* :mod:`~cordvoice.bench.process`: child processes driven by commands over a pipe, so the emulator and the
  code under test never share a core or an event loop.
* :mod:`~cordvoice.bench.host`: the emulator's side of a benchmark (it runs in its own process).
* :mod:`~cordvoice.bench.member`: a light voice member that completes the DAVE group in a channel and never
  reads media, so a benchmark's DAVE channels cost the emulator's core as little as possible.

``docs/benchmarks.md`` holds the results and explains what bounds each figure.
"""

from __future__ import annotations

__all__: list[str] = []
