"""The processes of a process group or a session, read from /proc: for the tests that check
that raceguard leaves nothing running (Ctrl-C, SIGTERM)."""

from __future__ import annotations

import os
from pathlib import Path

_FIELD = {"group": 2, "session": 3}  # after the command name in /proc/PID/stat: state, ppid, pgrp, session


def live_members(ident: int, of: str = "group") -> list[str]:
    """``PID CMDLINE`` of each live process of process group ``ident`` (``of="group"``) or of
    session ``ident`` (``of="session"``); zombies waiting for init to reap them are left out."""
    field = _FIELD[of]
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[field]) == ident and fields[0] not in ("Z", "X"):
            members.append(f"{entry} {cmdline}")
    return members
