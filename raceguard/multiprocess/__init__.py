"""Processes of one run in one happens-before: what ``torch.multiprocessing`` and
``multiprocessing`` hand between processes, and the storages they share.

Owns three things, installed in every checked process (the target's, its workers, its forks):

* :mod:`.clocks`: vector clocks that name timelines across processes (``PID:TIMELINE``); the
  timelines of other processes a process learns of are *phantom* timelines of its own engine, so
  its locks, queues and thread starts carry that knowledge like any other;
* :mod:`.shared`: one identity per storage in shared memory, the same in every process that maps
  it (the shared-memory file's device and inode, or its name), and the stream of accesses to such
  storages that the supervisor checks across processes (:mod:`.crosscheck`, pure, no torch);
* :mod:`.handoffs`: the edges ``multiprocessing`` creates (``Process.start``/``join``, its locks
  and semaphores, queues, pipes, process pools), each carrying a clock: in the pickled payload,
  or for primitives that live in shared memory, in a file per primitive beside the supervisor's
  socket.
"""
