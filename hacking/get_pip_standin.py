# Stand-in for the pip bootstrap script that ansible-test downloads from ci-files.testing.ansible.com
# (out of reach here). ansible-test runs it in a fresh virtual environment with pip's options and the
# pinned packages as arguments; ensurepip gives the environment a pip, then pip installs the pins
# from PyPI. ensurepip's pip has no --no-setuptools/--no-wheel options (they belong to get-pip.py).
"""Bootstrap pip in the running interpreter's environment, then pip install the arguments."""

from __future__ import annotations

import subprocess
import sys

subprocess.check_call([sys.executable, "-m", "ensurepip", "--default-pip"])
args = [arg for arg in sys.argv[1:] if arg not in ("--no-setuptools", "--no-wheel")]
subprocess.check_call([sys.executable, "-m", "pip", "install"] + args)
