#!/usr/bin/env python
"""Per-op cost of raceguard's capture, broken down, in one process.

Times N small in-place ops (``a.add_(b)`` on 16-element float tensors) three ways, in alternating
rounds so that other load on the machine hits all three alike:

* plain: no dispatch mode;
* a no-op ``TorchDispatchMode`` (``_should_skip_dynamo`` returns False, like raceguard's): the
  price of leaving C++ for Python on every op, which any Python-level capture pays;
* raceguard's capture, installed the way ``raceguard/process/child.py`` does (a ``Session`` with
  a no-op sink, ``sync.install()``, ``session.ACTIVE``, ``enter_thread`` on the main thread).

Then it times the pieces of ``Session.on_op`` one by one on the same op (``current_site`` at the
benchmark's shallow stack and at a deeper one like a model's forward, ``plan_for``,
``tensor_args``, ``untyped_storage``, ``byte_ranges``, the shadow look-up, ``hb.record`` +
``hb.access``, the session lock, ``output_tensors``/``_fresh``) so their sum can be set against
the measured difference. Nothing here is asserted: it prints µs/op.

Usage: python benchmarks/micro_dispatch.py [--ops 20000] [--rounds 7] [--torch-threads 1]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _micro_dispatch_impl import main  # noqa: E402

if __name__ == "__main__":
    main()
