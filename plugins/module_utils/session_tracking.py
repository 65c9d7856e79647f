# -*- coding: utf-8 -*-
# Copyright: virtguard.console contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Console sessions as the event source knows them: which are open on one hypervisor, whether
each has passed ``initialize``, how long it lasted, and how a snapshot of the clients QEMU
reports is reconciled with that knowledge after a (re)connection."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type


class OpenSession:
    """What is remembered of an open session: enough to report its disconnect later."""

    __slots__ = ("started", "authenticated", "details")

    def __init__(self, started, authenticated, details):
        self.started = started
        self.authenticated = authenticated
        # (domain, local, remote, auth_scheme, subject) as last seen
        self.details = details


class SessionTracker:
    """The open sessions of one hypervisor, keyed by session id."""

    def __init__(self):
        self.sessions = {}

    def __len__(self):
        return len(self.sessions)

    def observe(self, session_id, phase, now, details):
        """Record a live event; return the payload's ``session`` mapping for it."""
        subject = details[4]
        if phase == "connect":
            self.sessions[session_id] = OpenSession(now, False, details)
            return {"id": session_id, "authenticated": False}
        if phase == "initialize":
            session = self.sessions.get(session_id)
            if session is None:
                session = self.sessions[session_id] = OpenSession(now, True, details)
            session.authenticated = True
            session.details = details
            return {"id": session_id, "authenticated": True}
        # disconnect (and any phase libvirt may add later) ends the session
        session = self.sessions.pop(session_id, None)
        if session is None:
            # Began before the source saw it and no snapshot told us: libvirt repeats the
            # subject on the disconnect of an authenticated session only.
            return {"id": session_id, "authenticated": bool(subject), "duration_s": None}
        return {
            "id": session_id,
            "authenticated": session.authenticated,
            "duration_s": round(now - session.started, 3),
        }

    def reconcile(self, present, now, touched=frozenset()):
        """Merge a snapshot into the tracker.

        ``present`` maps session id -> details of every client QEMU reports now. Sessions with a
        live event since the snapshot was taken (``touched``) are left to those live events.
        Returns ``(initialized, gone)``: lists of ``(session_id, session mapping, details)`` for
        the snapshot ``initialize`` and ``disconnect`` events to emit, in a stable order.
        """
        initialized = []
        for session_id, details in present.items():
            if session_id in touched:
                continue
            session = self.sessions.get(session_id)
            if session is None:
                session = self.sessions[session_id] = OpenSession(now, True, details)
            session.authenticated = True
            if details[4] or not session.details[4]:
                session.details = details
            initialized.append((session_id, {"id": session_id, "authenticated": True}, session.details))
        gone = []
        for session_id in [sid for sid in self.sessions if sid not in present and sid not in touched]:
            session = self.sessions.pop(session_id)
            gone.append((
                session_id,
                {"id": session_id, "authenticated": session.authenticated,
                 "duration_s": round(now - session.started, 3)},
                session.details,
            ))
        return initialized, gone
