#!/usr/bin/env bash
# Runs popgate the way the Kubernetes pod does, without Kubernetes: the
# ConfigMap's popgate.toml, as uid/gid 65532 with no capabilities and
# no_new_privs, in a private network namespace (nothing it binds is
# visible outside, and no port can clash with other tests). Then it checks
# what the manifests rely on:
#   - /healthz and /readyz answer 200 on the admin port, /metrics is
#     Prometheus text;
#   - a cleartext login on the STLS port is refused (loopback_is_secure is
#     false), STLS and implicit TLS logins work, with the certificate from
#     the directory the Secret is mounted as;
#   - SIGTERM: /readyz fails at once; for drain_delay_secs popgate still
#     accepts and serves new logins; it waits for the open session and
#     exits 0 once it closes, within terminationGracePeriodSeconds
#     (drain_delay_secs + shutdown_grace_secs + 5, without a preStop sleep).
#
#   smoke-pod.sh BINARY POPGATE_TOML WORKDIR [docker]
#   smoke-pod.sh BINARY POPGATE_TOML WORKDIR oauth SECRET_ENV_JSON
#
# `oauth` runs an OAuth configuration (README's "OAuth in Kubernetes") as
# its pod does: the backend is kept (nothing is reachable from the
# namespace, so no token is ever fetched), the token store goes to a
# directory of group 65532 (the PersistentVolumeClaim with fsGroup), and
# the variables the Deployment takes from Secrets (SECRET_ENV_JSON, written
# by check_manifests.py) get made-up values of the right kind: a key from
# `popgate oauth keygen`, device password hashes from `popgate passwd`. It
# checks that popgate starts and is ready, that a device's right password
# gets `-ERR [SYS/TEMP]` (no token yet: someone must sign in) and a wrong
# one `-ERR [AUTH]`, that `popgate oauth status` (the `kubectl exec` step)
# works as the pod's user and names the account, and that SIGTERM ends it
# cleanly.
#
# Only the backend is replaced (by the demo store: no network here) and
# the certificate paths are pointed at a self-signed certificate in
# WORKDIR. With `docker`, the namespace gets Docker's
# net.ipv4.ip_unprivileged_port_start=0, for the image's own configuration
# (port 110 as a non-root user). Needs root (for the namespace and
# setpriv), curl, openssl and ip; exits 77 when it cannot run here, 1 on a
# failed check.
set -euo pipefail
binary=$(realpath "$1")
source_toml=$2
dir=$(realpath -m "$3")
mode=${4:-pod}
secret_env=${5:-}
uid=65532

for tool in unshare setpriv curl openssl ip; do
    command -v "$tool" >/dev/null || { echo "SKIP: $tool is missing"; exit 77; }
done
[ "$(id -u)" -eq 0 ] || { echo "SKIP: needs root (network namespace, setpriv)"; exit 77; }
unshare -n true 2>/dev/null || { echo "SKIP: cannot create a network namespace here"; exit 77; }

rm -rf "$dir"
mkdir -p "$dir/tls"
chmod 0755 "$dir" "$dir/tls"

# The Secret's files: kubernetes.io/tls keys, the key 0440 group 65532
# (defaultMode 0440 with fsGroup 65532).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj /CN=popgate.test -addext "subjectAltName=IP:127.0.0.1,DNS:localhost" \
    -keyout "$dir/tls/tls.key" -out "$dir/tls/tls.crt" 2>/dev/null
chgrp "$uid" "$dir/tls/tls.key" "$dir/tls/tls.crt"
chmod 0440 "$dir/tls/tls.key" "$dir/tls/tls.crt"

python3 - "$source_toml" "$dir/popgate.toml" "$dir/tls" "$mode" "$dir/state" <<'EOF'
import re, sys
src, dst, tls, mode, state = sys.argv[1:]
out, skip = [], False
for line in open(src):
    if re.match(r"\s*\[", line):
        skip = mode != "oauth" and re.match(r"\s*\[backend\]", line) is not None
    if not skip:
        out.append(line.replace("/etc/popgate/tls", tls).replace("/var/lib/popgate", state))
if mode != "oauth":
    out.append('\n[backend]\nkind = "demo"\n')
open(dst, "w").write("".join(out))
EOF
chmod 0444 "$dir/popgate.toml"

# oauth: the volume, and the Secrets' values.
device_password=smoke-Device-pw-1
: >"$dir/pod.env"
if [ "$mode" = oauth ]; then
    mkdir -p "$dir/state"
    chgrp "$uid" "$dir/state"
    chmod 2770 "$dir/state"
    "$binary" oauth keygen "$dir/token.key" --owner root >/dev/null 2>&1
    hash=$(printf '%s\n' "$device_password" | "$binary" passwd)
    python3 - "$secret_env" "$dir/popgate.toml" "$dir/token.key" "$hash" >"$dir/pod.env" <<'EOF'
import json, re, sys, tomllib
entries, config, key_file, device_hash = sys.argv[1:]
text = open(config).read()
key_env = tomllib.loads(text).get("token_store", {}).get("key_env")
env = {}
for e in json.load(open(entries)):
    name = e["env"]
    if name == key_env:
        env[name] = open(key_file).read().strip()
    elif name.endswith("PASSWORD_HASH"):
        env[name] = device_hash
    else:
        env[name] = "smoke-made-up-" + e["key"]
# Variables the configuration names (client_secret_env, …): the backend
# credentials Secret, taken whole (envFrom).
for name in re.findall(r'^\s*[a-z_]*_env\s*=\s*"([^"]+)"', text, re.M):
    env.setdefault(name, "smoke-made-up-secret")
for name, value in env.items():
    print(f"{name}={value}")
EOF
    rm -f "$dir/token.key"
    grep -q "PASSWORD_HASH=" "$dir/pod.env" || { echo "  FAIL no device password hash among the pod's Secret variables"; exit 1; }
fi

# The ports, from the configuration itself.
read -r plain pop3 pop3s admin grace drain < <(python3 - "$dir/popgate.toml" <<'EOF'
import sys, tomllib
c = tomllib.load(open(sys.argv[1], "rb"))
def first(mode):
    found = [l["address"].rsplit(":", 1)[1] for l in c["listener"] if l.get("tls", "none") == mode]
    return found[0] if found else "-"
print(first("none"), first("starttls"), first("implicit"),
      c["admin"]["address"].rsplit(":", 1)[1], c.get("limits", {}).get("shutdown_grace_secs", 30),
      c.get("limits", {}).get("drain_delay_secs", 0))
EOF
)

# Everything below runs inside the namespace (single quotes: expanded there).
# oauth: the first device of the first account, and that account.
read -r account device < <(python3 - "$dir/popgate.toml" <<'EOF'
import sys, tomllib
accounts = tomllib.load(open(sys.argv[1], "rb")).get("account", [])
devices = accounts[0].get("device", []) if accounts else []
print(accounts[0]["name"] if accounts else "-", devices[0]["user"] if devices else "-")
EOF
)
export binary dir uid plain pop3 pop3s admin grace drain mode account device device_password
# shellcheck disable=SC2016
exec unshare -n bash -euo pipefail -c '
ip link set lo up
if [ "$mode" = docker ]; then
    # What Docker (20.10 and later) sets in every container network namespace.
    sysctl -q -w net.ipv4.ip_unprivileged_port_start=0
fi
failed=0
check() { if "${@:2}"; then echo "  ok   $1"; else echo "  FAIL $1"; failed=1; fi; }
url() { curl -s -o /dev/null -w "%{http_code}" --max-time 3 "http://127.0.0.1:$admin$1"; }

# As the pod runs: its uid, no capabilities, the Secrets as environment.
as_pod() {
    # shellcheck disable=SC2046 # one NAME=VALUE per line, no spaces
    env $(cat "$dir/pod.env") setpriv --reuid "$uid" --regid "$uid" --clear-groups --inh-caps=-all \
        --bounding-set=-all --no-new-privs -- "$@"
}
# A device login over STLS; prints the reply to PASS (curl says only
# "login denied", whatever the -ERR).
stls_login() {
    python3 - "$pop3" "$dir/tls/tls.crt" "$1" "$2" <<"EOF"
import poplib, ssl, sys
port, ca, user, password = sys.argv[1:]
pop = poplib.POP3("127.0.0.1", int(port), timeout=10)
pop.stls(ssl.create_default_context(cafile=ca))
pop.user(user)
try:
    print(pop.pass_(password).decode())
except poplib.error_proto as e:
    print(e.args[0].decode())
EOF
}
# shellcheck disable=SC2046 # one NAME=VALUE per line, no spaces
env $(cat "$dir/pod.env") setpriv --reuid "$uid" --regid "$uid" --clear-groups --inh-caps=-all \
    --bounding-set=-all --no-new-privs -- "$binary" serve --config "$dir/popgate.toml" 2>"$dir/popgate.log" &
pid=$!
for _ in $(seq 50); do [ "$(url /healthz)" = 200 ] && break; sleep 0.2; done
check "runs as uid $uid without capabilities: $(grep -E "^(Uid|CapEff)" /proc/$pid/status | tr -s "\t\n" "  ")" \
    grep -qE "^Uid:\s+$uid\s" /proc/$pid/status
check "GET /healthz -> 200" test "$(url /healthz)" = 200
ready=000
for _ in $(seq 25); do ready=$(url /readyz); [ "$ready" = 200 ] && break; sleep 0.2; done
check "GET /readyz -> 200" test "$ready" = 200
check "GET /metrics is Prometheus text with popgate_ metrics" \
    bash -c "curl -s --max-time 3 http://127.0.0.1:$admin/metrics | grep -q \"^popgate_\""
if [ "$mode" = oauth ]; then
    said=$(stls_login "$device" "$device_password" 2>&1 || true)
    check "device $device, right password, no token yet: $said" test "${said#-ERR \[SYS/TEMP\]}" != "$said"
    said=$(stls_login "$device" wrong-password 2>&1 || true)
    check "device $device, wrong password: $said" test "${said#-ERR \[AUTH\]}" != "$said"
    status_ok=0
    said=$(as_pod "$binary" oauth status --config "$dir/popgate.toml" 2>&1) || status_ok=$?
    check "popgate oauth status as uid $uid (the kubectl exec step), exit $status_ok: $(echo "$said" | tr "\n" " ")" \
        bash -c "test $status_ok = 0 && grep -q \"$account\" <<<\"\$0\"" "$said"
elif [ "$pop3" != - ]; then
    check "cleartext login on $pop3 refused (loopback_is_secure = false)" \
        bash -c "! curl -s --max-time 5 pop3://127.0.0.1:$pop3/ -u demo:demo >/dev/null"
    check "STLS login on $pop3 (certificate from $dir/tls)" \
        bash -c "curl -s --max-time 5 --ssl-reqd --cacert $dir/tls/tls.crt pop3://127.0.0.1:$pop3/ -u demo:demo | grep -q \"^1 \""
fi
if [ "$pop3s" != - ] && [ "$mode" != oauth ]; then
    check "implicit TLS login on $pop3s, RETR 1" \
        bash -c "curl -s --max-time 5 --cacert $dir/tls/tls.crt pop3s://127.0.0.1:$pop3s/1 -u demo:demo | grep -qi \"^subject:\""
fi
if [ "$plain" != - ] && [ "$mode" != oauth ]; then
    check "login on the cleartext listener $plain from loopback, RETR 1" \
        bash -c "curl -s --max-time 5 pop3://127.0.0.1:$plain/1 -u demo:demo | grep -qi \"^subject:\""
fi

# SIGTERM with a session open: draining fails /readyz, the process waits
# for the session, then exits 0.
port=$pop3s; [ "$port" != - ] || port=$pop3; [ "$port" != - ] || port=$plain
exec 5<>"/dev/tcp/127.0.0.1/$port"
sleep 1
start=$(date +%s)
kill -TERM "$pid"
sleep 1
check "SIGTERM with a session open: /readyz -> 503 while draining" test "$(url /readyz)" = 503
check "SIGTERM with a session open: still serving it" kill -0 "$pid"
if [ "$drain" -gt 1 ]; then
    # Within drain_delay_secs: endpoints may still send clients; they get served.
    if [ "$mode" = oauth ]; then
        said=$(stls_login "$device" "$device_password" 2>&1 || true)
        check "SIGTERM + 1 s, drain_delay_secs $drain: a new login is still answered: $said" \
            test "${said#-ERR \[SYS/TEMP\]}" != "$said"
    elif [ "$pop3s" != - ]; then
        check "SIGTERM + 1 s, drain_delay_secs $drain: a new login is still served (RETR 1)" \
            bash -c "curl -s --max-time 5 --cacert $dir/tls/tls.crt pop3s://127.0.0.1:$pop3s/1 -u demo:demo | grep -qi \"^subject:\""
    else
        check "SIGTERM + 1 s, drain_delay_secs $drain: a new login is still served (RETR 1)" \
            bash -c "curl -s --max-time 5 pop3://127.0.0.1:$port/1 -u demo:demo | grep -qi \"^subject:\""
    fi
    check "SIGTERM + 1 s: /readyz still 503 while accepting" test "$(url /readyz)" = 503
fi
exec 5>&-
status=0
for _ in $(seq $(( (drain + grace + 5) * 5 ))); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
if kill -0 "$pid" 2>/dev/null; then
    kill -KILL "$pid"; status=killed
else
    wait "$pid" || status=$?
fi
took=$(( $(date +%s) - start ))
check "exits 0 within drain_delay_secs + shutdown_grace_secs + 5 = $((drain + grace + 5)) s after SIGTERM (took ${took}s, status $status)" test "$status" = 0
check "did not stop before drain_delay_secs $drain was over (took ${took}s)" test "$took" -ge "$drain"
if [ "$failed" != 0 ]; then
    echo "  popgate log:"; sed "s/^/    /" "$dir/popgate.log" | tail -20
fi
exit "$failed"
'
