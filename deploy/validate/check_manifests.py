#!/usr/bin/env python3
"""Checks rendered popgate manifests (kustomize or Helm output).

Used by scripts/validate-deploy; runs in its tools venv (PyYAML and
kubernetes-validate come from there).

    check_manifests.py --kubernetes-version 1.30.0 --out DIR NAME=FILE...

For each rendering NAME (a multi-document YAML file) it
  1. validates every object against the Kubernetes OpenAPI schemas of that
     version, strictly (unknown fields are errors); an object whose schema
     is missing is an error too, except the Prometheus Operator's kinds,
     which are checked structurally here and by promtool later;
  2. checks what the schemas cannot: the promises the deployment makes and
     the ties between popgate.toml and the manifests (grace period with the
     drain delay, ports, probes, certificate mount, security context,
     selectors, policy, OAuth: one replica, token store and secrets);
  3. writes the popgate.toml of its ConfigMap to DIR/NAME.popgate.toml, the
     environment variables the pod takes from Secrets to
     DIR/NAME.secret-env.json, and
     the rule groups of any PrometheusRule to DIR/NAME.rules.yaml, for
     `popgate check-config` and `promtool check rules`.
Exits 1 when anything fails, after reporting every failure.
"""

import argparse
import ipaddress
import json
import sys
import tomllib
from pathlib import Path

import kubernetes_validate
import yaml

NONROOT_UID = 65532
OPERATOR_GROUP = "monitoring.coreos.com/"
GRACE_MARGIN_SECS = 5


class Rendering:
    def __init__(self, name, path):
        self.name = name
        self.path = path
        self.failures = []
        self.checked = []
        with open(path) as f:
            self.objects = [d for d in yaml.safe_load_all(f) if d]

    def fail(self, message):
        self.failures.append(message)

    def require(self, condition, message):
        if not condition:
            self.fail(message)
        return condition

    def of_kind(self, kind):
        return [o for o in self.objects if o.get("kind") == kind]


def port_of(address):
    """The port of a "host:port" or "[v6]:port" address."""
    return int(str(address).rsplit(":", 1)[1])


def host_of(address):
    return str(address).rsplit(":", 1)[0].strip("[]")


def validate_schemas(r, version):
    operator = 0
    for obj in r.objects:
        what = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        if str(obj.get("apiVersion", "")).startswith(OPERATOR_GROUP):
            check_operator_object(r, obj, what)
            operator += 1
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            r.fail(f"{what}: no Kubernetes {version} schema for {obj.get('apiVersion')} {obj.get('kind')}")
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            r.fail(f"{what}: {path}: {e.message}")
    if len(r.objects) > operator:
        r.checked.append(f"{len(r.objects) - operator} objects against the Kubernetes {version} schemas (strict)")
    if operator:
        r.checked.append(f"{operator} Prometheus Operator objects: structure here, rules by promtool below")


def check_operator_object(r, obj, what):
    kind = obj.get("kind")
    spec = obj.get("spec") or {}
    if kind == "PrometheusRule":
        groups = spec.get("groups")
        r.require(isinstance(groups, list) and groups, f"{what}: spec.groups is empty")
    elif kind in ("PodMonitor", "ServiceMonitor"):
        endpoints = spec.get("podMetricsEndpoints" if kind == "PodMonitor" else "endpoints")
        r.require(endpoints and all(e.get("port") == "admin" for e in endpoints), f"{what}: must scrape the port named admin")
        r.require(spec.get("selector", {}).get("matchLabels"), f"{what}: needs spec.selector.matchLabels")
    else:
        r.fail(f"{what}: unexpected Prometheus Operator kind")


def check_deployment(r, out_dir):
    deployments = r.of_kind("Deployment")
    if not r.require(len(deployments) == 1, f"expected one Deployment, found {len(deployments)}"):
        return None
    dep = deployments[0]
    spec = dep["spec"]
    pod = spec["template"]["spec"]
    pod_labels = spec["template"]["metadata"].get("labels", {})
    r.require(
        spec["selector"].get("matchLabels", {}).items() <= pod_labels.items(),
        "Deployment selector does not match its pod labels",
    )
    containers = pod["containers"]
    if not r.require(len(containers) == 1, "expected one container"):
        return None
    c = containers[0]

    # Security: the promises of deploy/README.md.
    psc = pod.get("securityContext", {})
    csc = c.get("securityContext", {})
    r.require(psc.get("runAsNonRoot") is True or csc.get("runAsNonRoot") is True, "runAsNonRoot is not true")
    r.require(csc.get("runAsUser", psc.get("runAsUser")) == NONROOT_UID, f"runAsUser is not {NONROOT_UID}")
    r.require(csc.get("allowPrivilegeEscalation") is False, "allowPrivilegeEscalation is not false")
    r.require(csc.get("readOnlyRootFilesystem") is True, "readOnlyRootFilesystem is not true")
    r.require(csc.get("capabilities", {}).get("drop") == ["ALL"], "capabilities.drop is not [ALL]")
    r.require(not csc.get("capabilities", {}).get("add"), "capabilities are added")
    seccomp = csc.get("seccompProfile", psc.get("seccompProfile", {}))
    r.require(seccomp.get("type") == "RuntimeDefault", "seccompProfile is not RuntimeDefault")
    r.require(pod.get("automountServiceAccountToken") is False, "the service account token is mounted")
    res = c.get("resources", {})
    for part in ("requests", "limits"):
        for resource in ("cpu", "memory"):
            r.require(resource in res.get(part, {}), f"resources.{part}.{resource} is not set")
    r.checked.append("security context (non-root 65532, read-only root, no capabilities, RuntimeDefault seccomp), resources")

    # The configuration: the ConfigMap mounted at /etc/popgate/popgate.toml.
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = c.get("volumeMounts", [])
    config_mount = [m for m in mounts if m["mountPath"] == "/etc/popgate/popgate.toml"]
    if not r.require(len(config_mount) == 1, "nothing is mounted at /etc/popgate/popgate.toml"):
        return None
    config_volume = volumes.get(config_mount[0]["name"], {})
    cm_name = config_volume.get("configMap", {}).get("name")
    cms = [o for o in r.of_kind("ConfigMap") if o["metadata"]["name"] == cm_name]
    if not r.require(len(cms) == 1, f"the mounted ConfigMap {cm_name} is not in the rendering"):
        return None
    key = config_mount[0].get("subPath", "popgate.toml")
    text = cms[0].get("data", {}).get(key)
    if not r.require(text, f"ConfigMap {cm_name} has no {key}"):
        return None
    toml_path = out_dir / f"{r.name}.popgate.toml"
    toml_path.write_text(text)
    try:
        config = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        r.fail(f"{cm_name}: popgate.toml is not TOML: {e}")
        return None
    r.require(c.get("args") == ["serve", "--config", "/etc/popgate/popgate.toml"], "container args are not `serve --config /etc/popgate/popgate.toml`")

    # Grace period: the kubelet waits for the preStop sleep, popgate's drain
    # delay (still accepting while /readyz says 503) and its shutdown grace.
    limits = config.get("limits", {})
    grace = limits.get("shutdown_grace_secs", 30)
    drain = limits.get("drain_delay_secs", 0)
    r.require(0 <= drain <= 30, f"drain_delay_secs {drain} is not within 0-30")
    sleep = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    want = sleep + drain + grace + GRACE_MARGIN_SECS
    r.require(
        pod.get("terminationGracePeriodSeconds") == want,
        f"terminationGracePeriodSeconds is {pod.get('terminationGracePeriodSeconds')}, want preStop sleep {sleep} "
        f"+ drain_delay_secs {drain} + shutdown_grace_secs {grace} + {GRACE_MARGIN_SECS} = {want}",
    )
    r.checked.append(
        f"terminationGracePeriodSeconds = preStop {sleep} + drain_delay_secs {drain} + shutdown_grace_secs {grace} + {GRACE_MARGIN_SECS}"
    )
    check_oauth(r, dep, c, config, volumes, mounts, out_dir)

    # Ports: every listener is a container port above 1024, and back.
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    listeners = config.get("listener", [])
    r.require(listeners, "popgate.toml has no [[listener]]")
    listener_ports = set()
    for listener in listeners:
        port = port_of(listener["address"])
        listener_ports.add(port)
        r.require(port > 1024, f"listener {listener['address']}: a port below 1024 needs root")
        r.require(host_of(listener["address"]) in ("0.0.0.0", "::"), f"listener {listener['address']} is not on every pod address")
        r.require(port in ports.values(), f"listener port {port} is not a container port")
        r.require(listener.get("loopback_is_secure") is False, f"listener {listener['address']}: loopback_is_secure must be false in a pod")
        if listener.get("allow_cleartext_login"):
            nets = listener.get("cleartext_networks", [])
            r.require(nets, f"listener {listener['address']} allows cleartext logins from anywhere")
            for net in nets:
                try:
                    ipaddress.ip_network(net)
                except ValueError:
                    r.fail(f"listener {listener['address']}: {net} is not a network")
    admin = config.get("admin", {})
    admin_address = admin.get("address", "127.0.0.1:9110")
    r.require(admin.get("enabled", True), "the admin listener is disabled, but the probes need it")
    r.require(host_of(admin_address) in ("0.0.0.0", "::"), f"admin address {admin_address} is not reachable by the kubelet")
    r.require(ports.get("admin") == port_of(admin_address), f"container port `admin` is not the admin address {admin_address}")
    for name, port in ports.items():
        r.require(name == "admin" or port in listener_ports, f"container port {name} ({port}) has no listener")
    r.require(c.get("livenessProbe", {}).get("httpGet", {}) == {"path": "/healthz", "port": "admin"}, "liveness probe is not GET /healthz on port admin")
    r.require(c.get("readinessProbe", {}).get("httpGet", {}) == {"path": "/readyz", "port": "admin"}, "readiness probe is not GET /readyz on port admin")
    r.require(config.get("log", {}).get("format") == "json", "logs are not JSON")
    r.checked.append(f"listeners {sorted(listener_ports)} = container ports, admin {admin_address} = probes' port")

    # Certificates: from a Secret mounted as a directory (renewals reach it).
    certs = config.get("tls", {}).get("certificates", [])
    uses_tls = any(listener.get("tls", "none") != "none" for listener in listeners)
    r.require(not uses_tls or certs, "a listener uses TLS but no certificate is configured")
    for cert in certs:
        for f in (cert["cert"], cert["key"]):
            holders = [m for m in mounts if f.startswith(m["mountPath"].rstrip("/") + "/")]
            if not r.require(holders, f"{f} is not under any volume mount"):
                continue
            m = holders[0]
            r.require("subPath" not in m, f"{f}: mounted with subPath, which never sees a renewed Secret")
            r.require("secret" in volumes.get(m["name"], {}), f"{f} does not come from a Secret")
    if certs:
        r.checked.append("certificates from a Secret mounted as a directory")
    return {"deployment": dep, "pod_labels": pod_labels, "ports": ports, "config": config}


def uses_oauth(config):
    return "token_store" in config or any(a.get("oauth") for a in config.get("account", []))


def check_oauth(r, dep, c, config, volumes, mounts, out_dir):
    """Accounts' secrets come from Secrets; with OAuth: one replica (one
    refresher), the token store on a writable PersistentVolumeClaim, its key
    from a Secret. Writes NAME.secret-env.json: the environment variables
    the pod takes from Secrets, for check-config."""
    env = {e["name"]: e for e in c.get("env", [])}
    from_secrets = []
    for e in env.values():
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            from_secrets.append({"env": e["name"], "secret": ref["name"], "key": ref["key"]})
        else:
            r.require(not e["name"].endswith(("PASSWORD_HASH", "_KEY", "SECRET", "PASSWORD")), f"env {e['name']} is not from a Secret")
    (out_dir / f"{r.name}.secret-env.json").write_text(json.dumps(from_secrets, indent=1))
    for i, account in enumerate(config.get("account", [])):
        for j, device in enumerate(account.get("device", [])):
            if "password_hash" not in device:
                name = f"POPGATE_ACCOUNT__{i}__DEVICE__{j}__PASSWORD_HASH"
                r.require(
                    "secretKeyRef" in env.get(name, {}).get("valueFrom", {}),
                    f"account {account.get('name')}: device {device.get('user')} has no password_hash, and {name} is not from a Secret",
                )
    if not uses_oauth(config):
        return
    state = config.get("state", {})
    if state.get("url"):
        # Shared state: tokens in Redis, refreshed under a lock there; any
        # number of replicas. The token key and the Redis password still
        # come from Secrets, and the URL holds no password.
        url = str(state["url"])
        rest = url.split("://", 1)[-1]
        userinfo = rest.split("@", 1)[0] if "@" in rest else ""
        r.require(url.startswith(("redis://", "rediss://")) and ":" not in userinfo, "state.url must not hold a password")
        if "password_env" in state:
            r.require("secretKeyRef" in env.get(state["password_env"], {}).get("valueFrom", {}),
                      f"state password_env {state['password_env']} is not set from a Secret")
        store = config.get("token_store", {})
        if "key_env" in store:
            r.require("secretKeyRef" in env.get(store["key_env"], {}).get("valueFrom", {}),
                      f"token store key_env {store['key_env']} is not set from a Secret")
        r.checked.append("OAuth with shared state: tokens in Redis, key and Redis password from Secrets, replicas as configured")
        return
    spec = dep["spec"]
    r.require(spec.get("replicas") == 1, f"OAuth accounts but replicas is {spec.get('replicas')}: two refreshers would race")
    r.require(not r.of_kind("HorizontalPodAutoscaler"), "OAuth accounts but a HorizontalPodAutoscaler")
    r.require(not r.of_kind("PodDisruptionBudget"), "OAuth accounts and a PodDisruptionBudget (one pod: it blocks every drain)")
    r.require(spec.get("strategy", {}).get("type") == "Recreate", "OAuth accounts: a rolling update runs two refreshers at once; use Recreate")
    store = config["token_store"] if "token_store" in config else {}
    r.require(store, "OAuth accounts but no [token_store]")
    path = str(store.get("path", ""))
    holders = [m for m in mounts if path.startswith(m["mountPath"].rstrip("/") + "/")]
    if r.require(holders, f"token store {path} is not on a volume (the root file system is read-only)"):
        m = max(holders, key=lambda m: len(m["mountPath"]))
        r.require(not m.get("readOnly"), f"token store volume {m['name']} is mounted read-only")
        r.require("subPath" not in m, f"token store volume {m['name']}: subPath breaks the atomic rename")
        claim = volumes.get(m["name"], {}).get("persistentVolumeClaim", {}).get("claimName")
        if r.require(claim, f"token store {path} is not on a PersistentVolumeClaim: tokens would not survive a restart"):
            claims = [o["metadata"]["name"] for o in r.of_kind("PersistentVolumeClaim")]
            if claim not in claims:
                r.checked.append(f"token store on the existing PersistentVolumeClaim {claim} (not in the rendering)")
    if "key_env" in store:
        r.require(
            "secretKeyRef" in env.get(store["key_env"], {}).get("valueFrom", {}),
            f"token store key_env {store['key_env']} is not set from a Secret",
        )
    elif "key_file" in store:
        holders = [m for m in mounts if str(store["key_file"]).startswith(m["mountPath"].rstrip("/") + "/")]
        r.require(holders and "secret" in volumes.get(holders[0]["name"], {}), f"key_file {store['key_file']} is not from a Secret")
    r.require(store.get("refresh", True) is True, "the only replica must refresh (token_store.refresh)")
    r.checked.append(f"OAuth: one replica, Recreate, no HPA/PDB, token store {path} on a writable PersistentVolumeClaim, key from a Secret")


def check_services(r, d):
    services = r.of_kind("Service")
    r.require(services, "no Service")
    pop3 = [s for s in services if "admin" not in {p.get("targetPort") for p in s["spec"]["ports"]}]
    r.require(len(pop3) == 1, "expected one POP3 Service (without the admin port)")
    for s in services:
        name = s["metadata"]["name"]
        r.require(s["spec"]["selector"].items() <= d["pod_labels"].items(), f"Service {name} selects no popgate pod")
        for p in s["spec"]["ports"]:
            r.require(p.get("targetPort") in d["ports"], f"Service {name}: targetPort {p.get('targetPort')} is not a named container port")
        if any(p.get("targetPort") == "admin" for p in s["spec"]["ports"]):
            r.require(s["spec"].get("type", "ClusterIP") == "ClusterIP", f"Service {name} publishes the unauthenticated admin port")
    cleartext = any(l.get("allow_cleartext_login") for l in d["config"].get("listener", []))
    for s in pop3:
        if s["spec"].get("type") in ("LoadBalancer", "NodePort"):
            r.require(
                s["spec"].get("externalTrafficPolicy") == "Local",
                f"Service {s['metadata']['name']}: externalTrafficPolicy must be Local, or popgate sees node addresses "
                "(per-address limits, throttling" + (", cleartext_networks" if cleartext else "") + ")",
            )
    r.checked.append(f"{len(services)} Services: selectors, named target ports, admin port cluster-internal")


def check_policy_objects(r, d):
    name = d["deployment"]["metadata"]["name"]
    for pdb in r.of_kind("PodDisruptionBudget"):
        r.require(pdb["spec"]["selector"]["matchLabels"].items() <= d["pod_labels"].items(), "PodDisruptionBudget selects no popgate pod")
        r.require(pdb["spec"].get("minAvailable", 0) >= 1, "PodDisruptionBudget minAvailable < 1")
    hpas = r.of_kind("HorizontalPodAutoscaler")
    for hpa in hpas:
        ref = hpa["spec"]["scaleTargetRef"]
        r.require(ref["kind"] == "Deployment" and ref["name"] == name, "HorizontalPodAutoscaler does not target the Deployment")
        r.require(hpa["spec"].get("minReplicas", 1) >= 2, "HorizontalPodAutoscaler minReplicas < 2")
    if not hpas and not uses_oauth(d["config"]):
        r.require(d["deployment"]["spec"].get("replicas", 1) >= 2, "fewer than 2 replicas")
    for np in r.of_kind("NetworkPolicy"):
        r.require(np["spec"]["podSelector"]["matchLabels"].items() <= d["pod_labels"].items(), "NetworkPolicy selects no popgate pod")
        r.require(set(np["spec"].get("policyTypes", [])) == {"Ingress", "Egress"}, "NetworkPolicy must govern ingress and egress")
        open_ports = set()
        for rule in np["spec"].get("ingress", []):
            rule_ports = {p["port"] for p in rule.get("ports", [])}
            if d["ports"]["admin"] in rule_ports:
                r.require(rule.get("from"), "NetworkPolicy admits the admin port from anywhere")
            open_ports |= rule_ports
        for port in d["ports"].values():
            r.require(port in open_ports, f"NetworkPolicy does not admit container port {port}")
        egress_ports = {p["port"] for rule in np["spec"].get("egress", []) for p in rule.get("ports", [])}
        r.require(53 in egress_ports, "NetworkPolicy blocks DNS")
        backend = d["config"].get("backend", {})
        if backend.get("kind") == "imap":
            want = backend.get("port") or (993 if backend.get("tls", "implicit") == "implicit" else 143)
            r.require(want in egress_ports, f"NetworkPolicy blocks the IMAP backend's port {want}")
        if backend.get("kind") in ("jmap", "gmail", "graph"):
            r.require(443 in egress_ports, f"NetworkPolicy blocks HTTPS to the {backend['kind']} backend")
        if uses_oauth(d["config"]):
            r.require(443 in egress_ports, "NetworkPolicy blocks HTTPS to the OAuth providers")
    r.checked.append(
        "PodDisruptionBudget/HPA/NetworkPolicy selectors and ports"
        f" ({len(r.of_kind('PodDisruptionBudget'))} PDB, {len(hpas)} HPA, {len(r.of_kind('NetworkPolicy'))} NetworkPolicy)"
    )


def write_rules(r, out_dir):
    rules = [o for o in r.of_kind("PrometheusRule")]
    if rules:
        groups = [g for o in rules for g in o["spec"]["groups"]]
        (out_dir / f"{r.name}.rules.yaml").write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kubernetes-version", required=True)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--schemas-only", action="store_true", help="only the schema validation (for loose manifests)")
    ap.add_argument("renderings", nargs="+", metavar="NAME=FILE")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    failed = False
    for item in args.renderings:
        name, _, path = item.partition("=")
        r = Rendering(name, path)
        validate_schemas(r, args.kubernetes_version)
        if not args.schemas_only:
            d = check_deployment(r, args.out)
            if d:
                check_services(r, d)
                check_policy_objects(r, d)
        write_rules(r, args.out)
        kinds = sorted({o.get("kind") for o in r.objects})
        if r.failures:
            failed = True
            print(f"  FAIL {name} ({path}):")
            for f in r.failures:
                print(f"       - {f}")
        else:
            print(f"  ok   {name}: {', '.join(kinds)}")
            for c in r.checked:
                print(f"         {c}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
