# Copyright: virtguard.console contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""How the module_utils run commands on the host: modules hand them AnsibleModule's
``run_command`` (``run(argv, data=None, ...) -> (rc, stdout, stderr)``) and ``get_bin_path``;
tests hand them fakes.

The module_utils call ``get_bin_path(name, True, opt_dirs)`` only (required): AnsibleModule
fails the module when the command is missing, so a path always comes back.

Python 3.8+ (the module_utils run on managed hosts): the aliases use typing's forms."""

from __future__ import annotations

from typing import Callable, Tuple

Run = Callable[..., Tuple[int, str, str]]
GetBinPath = Callable[..., str]
