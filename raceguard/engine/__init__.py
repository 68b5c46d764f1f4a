"""The analyses, pure Python and free of torch (owns: happens-before with vector clocks and
FastTrack epochs over interval shadow memory (:mod:`.hb`), the lock-order graph (:mod:`.lockgraph`),
the wait-for graph (:mod:`.waitfor`), CUDA stream clocks (:mod:`.streams`) and process-group
lanes (:mod:`.collectives`)). Imports nothing of raceguard: every other layer feeds it events.
"""
