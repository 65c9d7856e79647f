# Copyright: virtguard.console contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""libvirt-python as the event source uses it: the binding itself (absent is reported when the
source starts, with what to install), and the workaround for the references it keeps.

libvirt-python keeps one reference to the two address dicts and the subject list of every
graphics event it hands to Python: libvirt-override.c releases them only when the callback
fails (since 1.2.21, 2015). That is about 1 KB per event, never freed. The callback made by
``graphics_callback`` gives those references back, for the versions in
``GRAPHICS_REFERENCES_LEAK_IN`` only: checked up to 12.8.0, a later version is left alone until
checked, since giving back a reference the binding did release would free objects still in use.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import logging
from typing import Any, Callable, Dict, List, Tuple

try:
    import libvirt
    import libvirt_qemu
except ImportError as exc:  # reported when the source starts, with what to install
    libvirt = None
    libvirt_qemu = None
    LIBVIRT_IMPORT_ERROR: ImportError | None = exc
else:
    LIBVIRT_IMPORT_ERROR = None

__all__ = [
    "GRAPHICS_REFERENCES_LEAK_IN", "LIBVIRT_IMPORT_ERROR", "LIBVIRT_PYTHON_VERSION", "RELEASE_GRAPHICS_REFERENCES",
    "GraphicsAddress", "GraphicsHandler", "GraphicsSubject", "graphics_callback", "graphics_references_leak",
    "libvirt", "libvirt_qemu", "log_libvirt_errors", "release_leaked_references", "warn_if_unchecked",
]

LOGGER = logging.getLogger("virtguard.console.libvirt_graphics")  # the source's one logger

GRAPHICS_REFERENCES_LEAK_IN = ("1.2.21", "12.8.0")

# The graphics callback's arguments as libvirt-python builds them: each address a dict
# {"family": int, "node": str, "service": str}, the subject a list of (type, name) pairs.
# Evaluated at run time, so typing's generics: plugins/ is held to Python 3.8 (pyproject.toml).
GraphicsAddress = Dict[str, object]
GraphicsSubject = List[Tuple[str, str]]
# (conn, dom, phase, local, remote, auth_scheme, subject, opaque)
GraphicsHandler = Callable[[Any, Any, int, GraphicsAddress, GraphicsAddress, str, GraphicsSubject, Any], None]


def version_tuple(version: str) -> tuple[int, ...] | None:
    try:
        return tuple(int(part) for part in version.split("."))
    except ValueError:
        return None


def graphics_references_leak(version: str | None) -> bool:
    """Whether this libvirt-python version is one known to keep the graphics arguments."""
    found = version_tuple(version) if version else None
    first, last = (version_tuple(v) for v in GRAPHICS_REFERENCES_LEAK_IN)
    return found is not None and first is not None and last is not None and first <= found <= last


def installed_libvirt_python() -> str | None:
    try:
        return importlib.metadata.version("libvirt-python")
    except importlib.metadata.PackageNotFoundError:
        return None


LIBVIRT_PYTHON_VERSION = installed_libvirt_python()
RELEASE_GRAPHICS_REFERENCES = LIBVIRT_IMPORT_ERROR is None and graphics_references_leak(LIBVIRT_PYTHON_VERSION)
PY_DECREF = ctypes.pythonapi.Py_DecRef  # pythonapi keeps the GIL held during the call
PY_DECREF.argtypes = (ctypes.py_object,)
PY_DECREF.restype = None


def release_leaked_references(*objects: object) -> None:
    """Give back the reference libvirt-python kept to each of ``objects`` (see above)."""
    for obj in objects:
        PY_DECREF(obj)


def graphics_callback(handle: GraphicsHandler, where: str, release: bool | None = None) -> GraphicsHandler:
    """The function to register with libvirt-python for graphics events: it calls ``handle``
    with libvirt's arguments, logs (under ``where``) what ``handle`` raises instead of raising
    it, then gives back the references the binding kept when ``release`` (by default, when the
    installed binding is one known to keep them: RELEASE_GRAPHICS_REFERENCES at this call).

    It must return normally: when a callback raises, the binding releases the arguments itself,
    and giving them back as well would free them twice."""
    if release is None:
        release = RELEASE_GRAPHICS_REFERENCES

    def on_libvirt_graphics(conn: Any, dom: Any, phase: int, local: GraphicsAddress, remote: GraphicsAddress,
                            auth_scheme: str, subject: GraphicsSubject, opaque: Any) -> None:
        try:
            handle(conn, dom, phase, local, remote, auth_scheme, subject, opaque)
        except Exception:  # never raise into libvirt-python (see above)
            LOGGER.exception("%s: the graphics callback failed", where)
        if release:
            release_leaked_references(local, remote, subject)

    return on_libvirt_graphics


def log_libvirt_errors() -> None:
    """Send the errors libvirt reports to the source's logger, at debug level, instead of stderr.

    By default libvirt prints every error to stderr ("libvirt: XML-RPC error : ..."), also those
    the source then receives as exceptions and logs with the hypervisor they belong to: each
    failed reconnection showed twice in an activation's log, once without its hypervisor, and
    errors of libvirt's event thread (a keepalive timeout) showed as bare lines. libvirt has one
    handler per process: other users of libvirt in the process stop printing to stderr too; the
    exceptions they receive are unchanged."""
    libvirt.registerErrorHandler(_log_libvirt_error, None)


def _log_libvirt_error(_context: object, error: tuple[Any, ...]) -> None:
    """libvirt's error handler: ``error`` is (code, domain, message, level, ...)."""
    LOGGER.debug("libvirt error %s (domain %s): %s", error[0], error[1], error[2])


def warn_if_unchecked() -> None:
    """Say at start when the installed binding is not one whose references are given back."""
    if not RELEASE_GRAPHICS_REFERENCES:
        LOGGER.warning("libvirt-python %s is not one of the versions checked for keeping the arguments of "
                       "graphics callbacks (%s to %s); if this process grows with console events, it still "
                       "does", LIBVIRT_PYTHON_VERSION or "(version unknown)", *GRAPHICS_REFERENCES_LEAK_IN)
