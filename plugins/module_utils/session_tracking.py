# Copyright: virtguard.console contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Console sessions as the event source knows them: which are open on one hypervisor, whether
each has passed ``initialize``, how long it lasted (and whether that length is exact, or only a
bound because the source did not see the session begin or end), and how a snapshot of the
clients QEMU reports is reconciled with that knowledge after a (re)connection."""

from __future__ import annotations

from typing import AbstractSet, Any, Dict, List, Mapping, Tuple

# (domain, local, remote, auth_scheme, subject) as last seen
Details = Tuple[Dict[str, Any], Dict[str, Any], Dict[str, Any], str, List[Any]]
# (session id, the payload's session mapping, details) for each event a snapshot yields
SnapshotEntry = Tuple[str, Dict[str, Any], Details]


class OpenSession:
    """What is remembered of an open session: enough to report its disconnect later.
    ``start_seen``: the source saw its ``connect`` live, so ``started`` is when it began."""

    __slots__ = ("started", "authenticated", "details", "start_seen")

    def __init__(self, started: float, authenticated: bool, details: Details, start_seen: bool) -> None:
        self.started = started
        self.authenticated = authenticated
        self.details = details
        self.start_seen = start_seen


class SessionTracker:
    """The open sessions of one hypervisor, keyed by session id."""

    def __init__(self) -> None:
        self.sessions: dict[str, OpenSession] = {}

    def __len__(self) -> int:
        return len(self.sessions)

    def observe(self, session_id: str, phase: str, now: float, details: Details) -> dict[str, Any]:
        """Record a live event; return the payload's ``session`` mapping for it."""
        subject = details[4]
        if phase == "connect":
            self.sessions[session_id] = OpenSession(now, False, details, start_seen=True)
            return {"id": session_id, "authenticated": False}
        if phase == "initialize":
            session = self.sessions.get(session_id)
            if session is None:  # its connect came before the source listened
                session = self.sessions[session_id] = OpenSession(now, True, details, start_seen=False)
            session.authenticated = True
            session.details = details
            return {"id": session_id, "authenticated": True}
        # disconnect (and any phase libvirt may add later) ends the session
        session = self.sessions.pop(session_id, None)
        if session is None:
            # Began before the source saw it and no snapshot told us: libvirt repeats the
            # subject on the disconnect of an authenticated session only.
            return {"id": session_id, "authenticated": bool(subject), "duration_s": None,
                    "duration_exact": False}
        return {
            "id": session_id,
            "authenticated": session.authenticated,
            "duration_s": round(now - session.started, 3),
            "duration_exact": session.start_seen,  # else a lower bound: it began earlier
        }

    def reconcile(self, present: Mapping[str, Details], now: float,
                  touched: AbstractSet[str] = frozenset()) -> tuple[list[SnapshotEntry], list[SnapshotEntry]]:
        """Merge a snapshot into the tracker.

        ``present`` maps session id -> details of every client QEMU reports now. Sessions with a
        live event since the snapshot was taken (``touched``) are left to those live events.
        Returns ``(initialized, gone)``: lists of ``(session_id, session mapping, details)`` for
        the snapshot ``initialize`` and ``disconnect`` events to emit, in a stable order.

        A session that is gone ended at some moment before ``now`` that the source did not see
        (it was not connected, or not listening): its ``duration_s`` runs to ``now``, an upper
        bound, hence ``duration_exact`` false.
        """
        initialized: list[SnapshotEntry] = []
        for session_id, details in present.items():
            if session_id in touched:
                continue
            session = self.sessions.get(session_id)
            if session is None:
                session = self.sessions[session_id] = OpenSession(now, True, details, start_seen=False)
            session.authenticated = True
            if details[4] or not session.details[4]:
                session.details = details
            initialized.append((session_id, {"id": session_id, "authenticated": True}, session.details))
        gone: list[SnapshotEntry] = []
        for session_id in [sid for sid in self.sessions if sid not in present and sid not in touched]:
            session = self.sessions.pop(session_id)
            gone.append((
                session_id,
                {"id": session_id, "authenticated": session.authenticated,
                 "duration_s": round(now - session.started, 3), "duration_exact": False},
                session.details,
            ))
        return initialized, gone
