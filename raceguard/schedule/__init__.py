"""The controlled scheduler behind ``raceguard stress`` and ``raceguard replay``.

* :mod:`.strategies` — which runnable thread continues at a scheduling point (pure Python).
* :mod:`.scheduler` — the baton: exactly one target thread runs at a time; logical blocking,
  virtual time, deadlock detection, the watchdog for uninstrumented blocking.
* :mod:`.simulate` — a tiny simulated program to unit-test strategies without threads.
* :mod:`.forkserver` / :mod:`.runchild` — a process that imports torch once and forks a fresh
  child per schedule, and what such a child runs.

This package's ``__init__`` imports nothing heavy: :func:`raceguard.yield_point` reads
:data:`hooks.yield_hook` on every call.
"""
