#!/usr/bin/env python3
"""Puts a rendered popgate.toml in the pod's surroundings, for
`popgate check-config`: the environment variables the pod takes from
Secrets (NAME.secret-env.json, written by check_manifests.py) get test
values of the right shape, the Secrets' files exist (a self-signed
certificate for the TLS Secret), and the token store's volume is a
directory of its own.

    pod_env.py POPGATE_TOML SECRET_ENV_JSON OUT_DIR

(SECRET_ENV_JSON may be absent: a configuration outside Kubernetes, e.g.
the systemd unit's, gets its certificate under /etc/popgate/tls only.)

Writes OUT_DIR/popgate.toml (the volume paths pointed into OUT_DIR) and
prints the environment as NUL-separated NAME=VALUE assignments.
"""

import base64
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

# A valid Argon2id PHC string of a password nobody knows (the placeholder
# of config/gmail-oauth.toml): what `popgate passwd` prints.
TEST_HASH = "$argon2id$v=19$m=19456,t=2,p=1$wxrOHId/C+dIBYXb2JB3fQ$yaYqWUlTYLcForHs501471xKMPAnl4rO3/KunVncaj4"
# The pod's writable volumes and mounted Secrets, as the manifests mount them.
TOKEN_STORE_DIR = "/var/lib/popgate"
SECRETS_DIR = "/run/secrets/popgate"
TLS_DIR = "/etc/popgate/tls"


def main():
    toml_path, env_json, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    text = open(toml_path).read()
    config = tomllib.loads(text)
    key_env = config.get("token_store", {}).get("key_env")
    env = {}
    secrets = out / "secrets"
    entries = json.load(open(env_json)) if os.path.exists(env_json) else []
    for e in entries:
        if e["env"] == key_env:
            value = base64.b64encode(os.urandom(32)).decode()
        elif e["env"].endswith("__PASSWORD_HASH"):
            value = TEST_HASH
        else:
            value = "validate-deploy-test-secret"
        env[e["env"]] = value
        # The Secret itself, as `kubectl create secret` would hold it.
        (secrets / e["secret"]).mkdir(parents=True, exist_ok=True)
        (secrets / e["secret"] / e["key"]).write_text(value)
    # Secrets the configuration names by variable (client_secret_env,
    # password_env) come from the backend credentials Secret (envFrom).
    for name in re.findall(r'^\s*[a-z_]*_env\s*=\s*"([^"]+)"', text, re.M):
        env.setdefault(name, "validate-deploy-test-secret")
    # ... and by file: that Secret mounted at /run/secrets/popgate.
    credentials = secrets / "backend-credentials"
    credentials.mkdir(parents=True, exist_ok=True)
    for path in re.findall(r'"' + re.escape(SECRETS_DIR) + r'/([^"]+)"', text):
        (credentials / path).parent.mkdir(parents=True, exist_ok=True)
        (credentials / path).write_text("validate-deploy-test-secret\n")
    text = text.replace(SECRETS_DIR, str(credentials))
    # The kubernetes.io/tls Secret mounted at /etc/popgate/tls: a
    # self-signed certificate.
    tls = secrets / "tls"
    for pair in config.get("tls", {}).get("certificates", []):
        cert, key = str(pair["cert"]), str(pair["key"])
        if not (cert.startswith(TLS_DIR + "/") and key.startswith(TLS_DIR + "/")):
            continue
        tls.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
             "-subj", "/CN=popgate.test", "-keyout", str(tls / os.path.basename(key)),
             "-out", str(tls / os.path.basename(cert))],
            check=True, capture_output=True,
        )
    text = text.replace(TLS_DIR, str(tls))
    # The token store's PersistentVolumeClaim: an empty directory.
    volume = out / "token-store"
    volume.mkdir(parents=True, exist_ok=True)
    text = text.replace(TOKEN_STORE_DIR, str(volume))
    (out / "popgate.toml").write_text(text)
    sys.stdout.write("".join(f"{k}={v}\0" for k, v in env.items()))


if __name__ == "__main__":
    main()
