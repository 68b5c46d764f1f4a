"""The op recorder and the session it feeds (owns: the session — the hub every subsystem reports
events to — the dispatch-mode recorder of tensor ops (:mod:`.torch_ops`), sites and stacks,
naming of tensors and findings, the autograd and torch.compile brackets, lock-cycle findings).

May import ``raceguard.engine`` and ``raceguard.report`` only. The subsystems that report to the
session (``raceguard.sync``, ``raceguard.hazards``, ``raceguard.cuda``, ``raceguard.distributed``)
import it, never the reverse: they register what the session calls back (see
``Session.hazard_rng_op``); ``raceguard.process`` wires them together for a run.
"""
