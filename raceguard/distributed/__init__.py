"""torch.distributed in the happens-before order (owns: the patches of asynchronous collectives
and point-to-point ops, their lanes per process group, and the findings they make).

May import ``raceguard.engine`` (the pure collectives model), ``raceguard.capture`` (the session
it reports to, naming, sites) and ``raceguard.report.finding``; installed per session by
``raceguard.process``. :mod:`.tracker` holds the patches and the session glue. Jobs of several
processes (torchrun, ``torch.multiprocessing``) are checked as a whole by ``raceguard.process``
(its worker hub); this package is about what one process's collectives order.
"""
