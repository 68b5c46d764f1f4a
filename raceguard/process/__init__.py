"""Running targets in processes (owns: everything about the checked process and its supervisor).

* the supervisor side: the prestarted child (:mod:`.prestart`), the supervisor that collects
  what it streams (:mod:`.supervisor`), the hub for the target's own Python children
  (:mod:`.workers`), and the glue of the ``check`` and ``stress``/``replay``/``merge`` commands
  (:mod:`.check`, :mod:`.stress`) — free of torch and click: the console script imports it first;
* the checked side: the target's process (:mod:`.child`), a worker's (:mod:`.child_worker`, started
  by ``bootstrap/sitecustomize.py``), activating a session with every subsystem
  (:mod:`.install`), running the target as ``__main__`` (:mod:`.runner`) and keeping raceguard's
  own imports out of its ``sys.modules`` (:mod:`.hidden`).

The composition root: it may import every subsystem; none of them imports it.
"""
