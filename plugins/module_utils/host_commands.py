# Copyright: virtguard.console contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""How the module_utils run commands on the host: modules hand them AnsibleModule's
``run_command`` (``run(argv, data=None, ...) -> (rc, stdout, stderr)``) and ``get_bin_path``;
tests hand them fakes.

The module_utils call ``get_bin_path(name, True, opt_dirs)`` only (required): AnsibleModule
fails the module when the command is missing, so a path always comes back.

Python 3.8+ (the module_utils run on managed hosts): the aliases use typing's forms."""

from __future__ import annotations

from typing import Any, Callable, Sequence, Tuple

Run = Callable[..., Tuple[int, str, str]]
GetBinPath = Callable[..., str]


def module_runner(module: Any) -> Run:
    """``run(argv, data=None) -> (rc, stdout, stderr)`` through ``module`` (an AnsibleModule):
    ``argv[0]`` is a command name (nft, ss), resolved once with ``get_bin_path`` and run from
    that path, never through a shell; a command missing on this host answers rc 127."""
    binaries: dict[str, str | None] = {}

    def run(argv: list[str], data: str | None = None) -> tuple[int, str, str]:
        if argv[0] not in binaries:
            binaries[argv[0]] = module.get_bin_path(argv[0])
        binary = binaries[argv[0]]
        if binary is None:
            return 127, "", f"{argv[0]} not found on this host"
        rc, out, err = module.run_command([binary, *argv[1:]], data=data, binary_data=True)
        return rc, out, err

    return run


def reusing_output(run: Run, argv: Sequence[str]) -> Run:
    """``run``, except that ``argv`` runs once: its later calls get the first answer. For a
    listing that one module run needs twice (``ss -t -l -p`` reads every process's sockets,
    which costs more the more QEMUs a host runs), where nothing it lists changes in between
    that matters."""
    answers: dict[str, tuple[int, str, str]] = {}

    def wrapped(cmd: list[str], data: str | None = None) -> tuple[int, str, str]:
        if data is not None or list(cmd) != list(argv):
            return run(cmd, data)
        if "first" not in answers:
            answers["first"] = run(cmd)
        return answers["first"]

    return wrapped
