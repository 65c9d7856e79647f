"""module_runner: how console_block runs nft and ss through its AnsibleModule (here a stand-in
that records what it is asked)."""

from __future__ import annotations

from typing import Any

from ansible_collections.virtguard.console.plugins.module_utils.host_commands import module_runner, reusing_output


class RecordingModule:
    """get_bin_path and run_command as AnsibleModule has them, answering from ``paths``."""

    def __init__(self, paths: dict[str, str]) -> None:
        self.paths = paths
        self.lookups: list[str] = []
        self.commands: list[tuple[list[str], dict[str, Any]]] = []

    def get_bin_path(self, name: str) -> str | None:
        self.lookups.append(name)
        return self.paths.get(name)

    def run_command(self, argv: list[str], **kwargs: Any) -> tuple[int, str, str]:
        self.commands.append((argv, kwargs))
        return 0, f"ran {argv[0]}", ""


def test_the_command_runs_from_the_path_found_once_with_its_input():
    module = RecordingModule({"nft": "/usr/sbin/nft"})
    run = module_runner(module)
    assert run(["nft", "-f", "-"], data="add table inet t\n") == (0, "ran /usr/sbin/nft", "")
    assert run(["nft", "-j", "list", "chains", "inet"])[0] == 0
    assert module.lookups == ["nft"]
    assert module.commands == [
        (["/usr/sbin/nft", "-f", "-"], {"data": "add table inet t\n", "binary_data": True}),
        (["/usr/sbin/nft", "-j", "list", "chains", "inet"], {"data": None, "binary_data": True}),
    ]


def test_a_missing_command_answers_127_and_runs_nothing():
    module = RecordingModule({})
    run = module_runner(module)
    assert run(["ss", "-t", "-l"]) == (127, "", "ss not found on this host")
    assert run(["ss", "-t", "-l"])[0] == 127
    assert module.lookups == ["ss"] and module.commands == []


def test_a_listing_reused_runs_once_and_other_commands_run_each_time():
    calls: list[list[str]] = []

    def run(argv: list[str], data: str | None = None) -> tuple[int, str, str]:
        calls.append(argv)
        return 0, f"answer {len(calls)}", ""

    reusing = reusing_output(run, ["ss", "-t", "-l"])
    assert reusing(["ss", "-t", "-l"]) == (0, "answer 1", "")
    assert reusing(["ss", "-t", "-l"]) == (0, "answer 1", "")  # the first answer again
    assert reusing(["nft", "-f", "-"], "add element") == (0, "answer 2", "")
    assert reusing(["ss", "-t"]) == (0, "answer 3", "")
    assert calls == [["ss", "-t", "-l"], ["nft", "-f", "-"], ["ss", "-t"]]
