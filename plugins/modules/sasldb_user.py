#!/usr/bin/python
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: sasldb_user
short_description: Manage a user of a Cyrus SASL password database (sasldb)
version_added: 0.1.0
description:
  - Creates, updates or removes one user of a sasldb with C(saslpasswd2), such as the users
    that log in to QEMU's VNC consoles with SASL (the C(virtguard.console.vnc_sasl) role).
  - The password reaches C(saslpasswd2) on its standard input, never on a command line.
  - Like M(ansible.builtin.user), an existing user's password is left alone unless
    O(update_password=always). A sasldb cannot tell whether a password differs without
    reading it back, so V(always) rewrites it and reports a change on every run.
author:
  - virtguard.console developers (@virtguard)
requirements:
  - C(saslpasswd2) and C(sasldblistusers2) on the host (Debian C(sasl2-bin), Red Hat C(cyrus-sasl))
extends_documentation_fragment:
  - virtguard.console.attributes
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
options:
  name:
    description: The user name, as the client types it.
    type: str
    required: true
  password:
    description: The password. Required to create a user or with O(update_password=always).
    type: str
  state:
    description: Whether the user exists.
    type: str
    choices: [present, absent]
    default: present
  update_password:
    description: V(on_create) sets the password only for a new user; V(always) rewrites it.
    type: str
    choices: [always, on_create]
    default: on_create
  path:
    description: The sasldb file; it is created with the first user.
    type: path
    required: true
  app_name:
    description: The application name given to C(saslpasswd2 -a).
    type: str
    default: qemu
  realm:
    description:
      - The user's realm. By default the host's canonical name, under which QEMU (which
        opens its SASL server without a realm) looks users up.
    type: str
"""

EXAMPLES = r"""
- name: Let alice log in to the VNC consoles
  virtguard.console.sasldb_user:
    name: alice
    password: "{{ vault_alice_vnc_password }}"
    path: /etc/sasl2/qemu-vnc.sasldb
"""

RETURN = r"""
realm:
  description: The realm the user is stored under.
  returned: always
  type: str
  sample: hypervisor1.example.com
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.virtguard.console.plugins.module_utils.sasldb import (
    Sasldb,
    SasldbError,
    default_realm,
)


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            name=dict(type="str", required=True),
            password=dict(type="str", no_log=True),
            state=dict(type="str", choices=["present", "absent"], default="present"),
            update_password=dict(type="str", choices=["always", "on_create"],
                                 default="on_create"),
            path=dict(type="path", required=True),
            app_name=dict(type="str", default="qemu"),
            realm=dict(type="str"),
        ),
        required_if=[("update_password", "always", ["password"])],
        supports_check_mode=True,
    )
    params = module.params
    name = params["name"]
    realm = params["realm"] or default_realm()
    db = Sasldb(module.run_command, module.get_bin_path, path=params["path"],
                app_name=params["app_name"])
    try:
        exists = (name, realm) in db.users()
        if params["state"] == "absent":
            changed = exists
            if changed and not module.check_mode:
                db.delete(name, realm)
        else:
            changed = not exists or params["update_password"] == "always"
            if not exists and not params["password"]:
                module.fail_json(msg=f"user {name} does not exist yet: give it a password")
            if changed and not module.check_mode:
                db.set_password(name, realm, params["password"])
    except SasldbError as exc:
        module.fail_json(msg=str(exc), realm=realm)
    module.exit_json(changed=changed, name=name, realm=realm, state=params["state"])


if __name__ == "__main__":
    main()
