"""Loads deploy/k8s/*.yaml the way the Job controller and the kubelet would
use them, and checks that every field the workers read is set.

  k8s_manifests.py check DIR
      the static checks (below); prints what each pod gets
  k8s_manifests.py render DIR OUT MOUNTS
      writes OUT/pod<i>.sh, the environment and command of pod i, with every
      volume mounted under MOUNTS/<volume> (config maps written out, claims
      as empty folders; the mount paths in the command, the environment and
      the config maps are rewritten to those folders, as a kubelet would
      mount them), OUT/ref.yaml, the job as one single-process worker, and
      OUT/job.json (world, steps, the coordinator's DNS name, the data dir)

What a worker reads (src/runtime/worker.cpp): RANK (from the completion
index), WORLD_SIZE (= completions = parallelism = the job file's devices),
MASTER_ADDR:MASTER_PORT (pod 0's name under the headless Service, which runs
the coordinator), ARCHIPELAGO_SECRET (from the Secret) and --job (a file of
the ConfigMap). Exits 1 naming the first field that is wrong.
"""
import glob
import json
import os
import re
import shlex
import sys

import yaml

INDEX_ANNOTATION = "metadata.annotations['batch.kubernetes.io/job-completion-index']"


class Bad(Exception):
    pass


def need(cond, what):
    if not cond:
        raise Bad(what)


def load(d):
    objs = {}
    for path in sorted(glob.glob(os.path.join(d, "*.yaml"))):
        for doc in yaml.safe_load_all(open(path)):
            if doc:
                need(doc.get("kind") not in objs, "two objects of kind %s" % doc.get("kind"))
                objs[doc["kind"]] = doc
    for kind in ("Job", "Service", "Secret", "ConfigMap"):
        need(kind in objs, "no %s in %s" % (kind, d))
    return objs


def secret_value(secret, key):
    if key in (secret.get("stringData") or {}):
        return secret["stringData"][key]
    if key in (secret.get("data") or {}):
        import base64
        return base64.b64decode(secret["data"][key]).decode()
    raise Bad("Secret %s has no key %s" % (secret["metadata"]["name"], key))


def expand(s, env):
    # Kubernetes' $(VAR) references in env values, command and args.
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), s)


def pod_env(objs, container, index):
    """The environment of pod `index`, as the kubelet sets it."""
    env = {"JOB_COMPLETION_INDEX": str(index)}
    for e in container.get("env") or []:
        name = e["name"]
        if "value" in e:
            env[name] = expand(str(e["value"]), env)
            continue
        vf = e.get("valueFrom") or {}
        if "fieldRef" in vf:
            need(vf["fieldRef"]["fieldPath"] == INDEX_ANNOTATION,
                 "env %s: fieldRef %s is not the completion index" % (name, vf["fieldRef"]["fieldPath"]))
            env[name] = str(index)
        elif "secretKeyRef" in vf:
            ref = vf["secretKeyRef"]
            need(ref["name"] == objs["Secret"]["metadata"]["name"],
                 "env %s: secretKeyRef names Secret %s, not %s" % (name, ref["name"], objs["Secret"]["metadata"]["name"]))
            env[name] = secret_value(objs["Secret"], ref["key"])
        else:
            raise Bad("env %s: unsupported valueFrom %s" % (name, list(vf)))
    return env


def mounts(objs, container):
    """[(mount path, volume)] for the container's mounts, longest path first."""
    vols = {v["name"]: v for v in objs["Job"]["spec"]["template"]["spec"].get("volumes") or []}
    out = []
    for m in container.get("volumeMounts") or []:
        need(m["name"] in vols, "volumeMount %s names no volume" % m["name"])
        out.append((m["mountPath"].rstrip("/"), vols[m["name"]]))
    return sorted(out, key=lambda x: -len(x[0]))


def job_file(objs, container, script):
    """The --job path, and the job file's text from the ConfigMap mounted there."""
    m = re.search(r"archipelago worker\b[^\n]*--job[ =](\S+)", script)
    need(m, "the container's command runs no `archipelago worker --job FILE`")
    path = m.group(1)
    for mount_path, vol in mounts(objs, container):
        if path.startswith(mount_path + "/"):
            cm = vol.get("configMap")
            need(cm, "--job %s is on volume %s, not a ConfigMap" % (path, vol["name"]))
            need(cm["name"] == objs["ConfigMap"]["metadata"]["name"], "volume %s names ConfigMap %s" % (vol["name"], cm["name"]))
            key = path[len(mount_path) + 1:]
            need(key in objs["ConfigMap"].get("data", {}), "ConfigMap %s has no key %s" % (cm["name"], key))
            return path, objs["ConfigMap"]["data"][key]
    raise Bad("--job %s is on no mounted volume" % path)


def check(objs):
    job, svc = objs["Job"], objs["Service"]
    spec, tmpl = job["spec"], job["spec"]["template"]
    need(spec.get("completionMode") == "Indexed", "Job spec.completionMode is %r, not Indexed" % spec.get("completionMode"))
    world = spec.get("completions")
    need(isinstance(world, int) and world >= 1, "Job spec.completions is not a positive integer")
    need(spec.get("parallelism") == world, "Job spec.parallelism %r != completions %d" % (spec.get("parallelism"), world))
    need(svc["spec"].get("clusterIP") == "None", "Service %s is not headless (clusterIP: None)" % svc["metadata"]["name"])
    need(svc["spec"].get("publishNotReadyAddresses") is True, "Service spec.publishNotReadyAddresses is not true")
    labels = tmpl["metadata"].get("labels") or {}
    sel = svc["spec"].get("selector") or {}
    need(sel and all(labels.get(k) == v for k, v in sel.items()), "Service selector %s does not select the pods %s" % (sel, labels))
    need(tmpl["spec"].get("subdomain") == svc["metadata"]["name"],
         "pod template subdomain %r is not the Service %s" % (tmpl["spec"].get("subdomain"), svc["metadata"]["name"]))
    containers = tmpl["spec"]["containers"]
    need(len(containers) == 1, "the pod template has %d containers, expected 1" % len(containers))
    c = containers[0]
    script = "\n".join(c.get("command", []) + c.get("args", []))
    pod0 = "%s-0.%s" % (job["metadata"]["name"], svc["metadata"]["name"])
    ports = {p["port"] for p in svc["spec"]["ports"]} & {p.get("targetPort", p["port"]) for p in svc["spec"]["ports"]}
    envs = [pod_env(objs, c, i) for i in range(world)]
    for i, env in enumerate(envs):
        for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "ARCHIPELAGO_SECRET"):
            need(env.get(k), "pod %d: env %s is not set" % (i, k))
        need(env["RANK"] == str(i), "pod %d: RANK is %s" % (i, env["RANK"]))
        need(env["WORLD_SIZE"] == str(world), "pod %d: WORLD_SIZE %s != completions %d" % (i, env["WORLD_SIZE"], world))
        need(env["MASTER_ADDR"].split(".svc")[0].split(".")[:2] == pod0.split("."),
             "pod %d: MASTER_ADDR %s is not pod 0 under the Service (%s)" % (i, env["MASTER_ADDR"], pod0))
        need(int(env["MASTER_PORT"]) in ports, "pod %d: MASTER_PORT %s is not a port of the Service" % (i, env["MASTER_PORT"]))
    need(re.search(r'archipelago coordinator\b.*--port "?\$MASTER_PORT', script) and re.search(r'"\$RANK" = 0', script),
         "pod 0 does not start `archipelago coordinator --port $MASTER_PORT`")
    path, text = job_file(objs, c, script)
    jf = yaml.safe_load(text)
    devices = sum(int(isl.get("count", 1)) for isl in jf["cluster"]["islands"])
    need(devices == world, "the job file's devices (%d) != completions (%d)" % (devices, world))
    shared = [p for p, v in mounts(objs, c) if "persistentVolumeClaim" in v]
    for field, value in (("data.dir", jf["data"]["dir"]), ("run_dir", jf["run_dir"])):
        need(any(value.startswith(p + "/") for p in shared), "the job file's %s %s is on no shared volume" % (field, value))
    return {"world": world, "pod0": pod0, "job_path": path, "job": jf, "container": c, "envs": envs, "script": script}


def render(objs, info, out, root):
    mnt = [(p, os.path.join(root, v["name"]), v) for p, v in mounts(objs, info["container"])]

    def local(s):
        for p, d, _ in mnt:
            s = re.sub(r"(?<![\w/.-])" + re.escape(p) + r"(?=/|\b)", d, s)
        return s

    for _, d, v in mnt:
        os.makedirs(d, exist_ok=True)
        if "configMap" in v:
            for k, text in objs["ConfigMap"].get("data", {}).items():
                open(os.path.join(d, k), "w").write(local(text))
    c = info["container"]
    argv = [local(expand(a, {})) for a in c.get("command", []) + c.get("args", [])]
    for i, env in enumerate(info["envs"]):
        lines = ["export %s=%s" % (k, shlex.quote(local(v))) for k, v in env.items()]
        lines.append("exec " + " ".join(shlex.quote(expand(a, env)) for a in argv))
        open(os.path.join(out, "pod%d.sh" % i), "w").write("\n".join(lines) + "\n")
    jf = yaml.safe_load(local(yaml.safe_dump(info["job"])))
    ref = dict(jf, cluster={"islands": [{"name": "a", "count": 1}]}, run_dir=os.path.join(out, "ref"))
    yaml.safe_dump(ref, open(os.path.join(out, "ref.yaml"), "w"))
    json.dump({"world": info["world"], "steps": jf["train"]["steps"], "pod0": info["pod0"],
               "data_dir": jf["data"]["dir"], "run_dir": jf["run_dir"]}, open(os.path.join(out, "job.json"), "w"))


def main():
    try:
        objs = load(sys.argv[2])
        info = check(objs)
        if sys.argv[1] == "render":
            render(objs, info, sys.argv[3], sys.argv[4])
    except Bad as e:
        print("FAIL: deploy/k8s: %s" % e)
        return 1
    print("deploy/k8s: %d pods, ranks 0..%d from the completion index, WORLD_SIZE %d, coordinator %s:%s, "
          "secret from Secret %s, job file %s" % (info["world"], info["world"] - 1, info["world"], info["pod0"],
                                                   info["envs"][0]["MASTER_PORT"], objs["Secret"]["metadata"]["name"],
                                                   info["job_path"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
