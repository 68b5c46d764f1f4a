"""The state every hazard hook shares: the session the hooks report to (``None`` until
:func:`raceguard.hazards.install`), the originals install() replaced, whether it did,
per-thread flags, and what was reported already. ``_session`` and ``_installed`` are rebound by
install() / uninstall(): read them as ``_state._session`` / ``_state._installed``, never import
the names themselves.
"""

from __future__ import annotations

import _thread
import threading
from typing import Any


# -- the session -----------------------------------------------------------------------------
_session: Any = None
_orig: dict[str, Any] = {}
_installed = False
_tls = threading.local()
_reported: set[str] = set()
_groups: dict[tuple, dict] = {}
_report_lock = _thread.allocate_lock()
