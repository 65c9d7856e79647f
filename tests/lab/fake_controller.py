"""A stand-in for automation controller's API, as much of it as ansible-rulebook's
``run_job_template`` uses (config, the job template lookup, launch, job polling), that runs the
launched job for real: ansible-playbook with the job template's playbook, the launch's extra
variables and limit, against an inventory of the test's. So a rulebook that remediates through
``run_job_template`` is tested end to end without a controller."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

from lab.rulebook_runner import ROOT, VENV_BIN

TEMPLATE_ID = 7


class FakeController:
    """``FakeController(template, playbook, inventory).start()``; ``url``; ``launches``: the
    launch requests received (their JSON bodies), ``jobs``: id -> status."""

    def __init__(self, template: str, playbook: str, inventory: dict[str, Any], organization: str = "Default") -> None:
        self.template = template
        self.playbook = playbook
        self.organization = organization
        self.workdir = Path(tempfile.mkdtemp(prefix="vgt-controller-"))
        self.inventory = self.workdir / "inventory.yml"
        self.inventory.write_text(yaml.safe_dump(inventory))
        self.launches: list[dict[str, Any]] = []
        self.jobs: dict[int, str] = {}
        self.outputs: dict[int, str] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/"

    def start(self) -> FakeController:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop serving and remove the work directory (inventory, the jobs' extra vars)."""
        self._server.shutdown()
        self._server.server_close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _run_job(self, job_id: int, body: dict[str, Any]) -> None:
        extra = self.workdir / f"job{job_id}.json"
        extra.write_text(json.dumps(body.get("extra_vars") or {}))
        cmd = [str(VENV_BIN / "ansible-playbook"), "-i", str(self.inventory), "-e", f"@{extra}", self.playbook]
        if body.get("limit"):
            cmd += ["--limit", body["limit"]]
        env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
                   ANSIBLE_COLLECTIONS_PATH=str(ROOT / "build" / "collections"))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        with self._lock:
            self.outputs[job_id] = proc.stdout + proc.stderr
            self.jobs[job_id] = "successful" if proc.returncode == 0 else "failed"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        controller = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _reply(self, body: dict[str, Any], status: int = 200) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                parts = urlsplit(self.path)
                query = parse_qs(parts.query)
                if parts.path == "/api/v2/config/":
                    self._reply({"version": "4.6.0"})
                elif parts.path == "/api/v2/unified_job_templates/":
                    found = query.get("name", [""])[0] == controller.template
                    self._reply({"count": int(found), "next": None, "results": [{
                        "type": "job_template", "name": controller.template, "id": TEMPLATE_ID,
                        "summary_fields": {"organization": {"name": controller.organization}},
                        "related": {"launch": f"/api/v2/job_templates/{TEMPLATE_ID}/launch/"},
                        "ask_limit_on_launch": True, "ask_labels_on_launch": False,
                        "ask_inventory_on_launch": False, "ask_variables_on_launch": True}] if found else []})
                elif parts.path == "/api/v2/jobs/":
                    ids = [int(i) for i in query.get("id__in", [""])[0].split(",") if i]
                    with controller._lock:
                        results = [{"id": i, "status": controller.jobs.get(i, "running"), "artifacts": {}}
                                   for i in ids]
                    self._reply({"count": len(results), "next": None, "results": results})
                else:
                    self._reply({"detail": "not found"}, 404)

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if urlsplit(self.path).path != f"/api/v2/job_templates/{TEMPLATE_ID}/launch/":
                    self._reply({"detail": "not found"}, 404)
                    return
                with controller._lock:
                    controller.launches.append(body)
                    job_id = len(controller.launches)
                    controller.jobs[job_id] = "running"
                threading.Thread(target=controller._run_job, args=(job_id, body), daemon=True).start()
                self._reply({"id": job_id, "job": job_id, "url": f"/api/v2/jobs/{job_id}/", "status": "pending"}, 201)

        return Handler
