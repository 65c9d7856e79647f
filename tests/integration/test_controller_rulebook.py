"""The rulebook for EDA controller, unauthorized_console_controller, end to end: real
ansible-rulebook with ``--controller-url``, remediating through ``run_job_template`` against a
stand-in for automation controller's API that runs the launched job (the collection's
remediate_console playbook, with the launch's extra variables and limit) for real."""

from __future__ import annotations

import ipaddress
import os
import subprocess

import pytest

from lab import rfb
from lab.fake_controller import FakeController
from lab.hypervisor import SessionHypervisor, wait_for
from lab.netns import ClientNamespace
from lab.rulebook_runner import RulebookRun, local_inventory, read_jsonl
from lab.server_view import established_peers, nft_blocks

pytestmark = pytest.mark.slow

NFT_TABLE = f"vg_c{os.getpid()}"
TEMPLATE = "virtguard remediate console"


def test_an_untrusted_session_is_cut_through_a_job_template_limited_to_its_hypervisor(tmp_path):
    hv = SessionHypervisor("ct", qemu_conf='vnc_listen = "0.0.0.0"\n').start()
    untrusted, trusted = ClientNamespace(20).create(), ClientNamespace(21).create()
    controller = FakeController(TEMPLATE, "virtguard.console.remediate_console", local_inventory()).start()
    activation = None
    try:
        domain = hv.create_domain(f"{hv.user}-d0", listen="0.0.0.0")
        audit = tmp_path / "audit.jsonl"
        activation = RulebookRun("unauthorized_console_controller", {
            "virtguard_uri": hv.uri,
            "virtguard_trusted_networks": [trusted.network],
            "virtguard_block_seconds": 30,
            "virtguard_nft_table": NFT_TABLE,
            "virtguard_audit_log": str(audit),
            "virtguard_job_template": TEMPLATE,
        }, tmp_path, extra_args=["--controller-url", controller.url, "--controller-token", "t0ken",
                                 "--controller-ssl-verify", "no"]).start()
        kept = trusted.call(rfb.open_session, trusted.host_ip, domain.vnc_port)
        sock = untrusted.call(rfb.open_session, untrusted.host_ip, domain.vnc_port)
        victim = (ipaddress.ip_address(untrusted.client_ip), sock.getsockname()[1])
        bystander = (ipaddress.ip_address(trusted.client_ip), kept.getsockname()[1])
        try:
            wait_for(lambda: victim not in established_peers([domain.vnc_port]), 90,
                     "the untrusted session to be cut through the job template")
            assert nft_blocks(NFT_TABLE, untrusted.client_ip)
            assert bystander in established_peers([domain.vnc_port]), "the trusted session was cut"
        finally:
            sock.close()
            kept.close()
        launch = controller.launches[0]
        assert launch["limit"] == "localhost"  # the batch's hypervisor, from event.meta.hosts
        verdict = launch["extra_vars"]["ansible_eda"]["event"]["virtguard"]
        assert verdict["remediate"] is True and verdict["batch"][0]["address"] == untrusted.client_ip
        wait_for(lambda: controller.jobs.get(1) not in (None, "running"), 60, "the job to end")
        assert controller.jobs[1] == "successful", controller.outputs.get(1)
        assert "virtguard_job_template" not in launch["extra_vars"]  # nothing but the event is sent
        events = [r for r in read_jsonl(audit) if r["record"] == "event"]
        assert any(e["virtguard"]["remediate"] for e in events)
    finally:
        if activation is not None:
            activation.stop()
        controller.stop()
        subprocess.run(["nft", "delete", "table", "inet", NFT_TABLE], capture_output=True, check=False)
        untrusted.delete()
        trusted.delete()
        hv.stop()
