"""deploy/ is consistent with itself, the CLI and the pipeline config, and valid for its schemas.

Parses the Dockerfiles (Docker's own parser, PyPI `dockerfile`), compose.yaml (validated against the
Compose Specification schema vendored in `check-jsonschema`) and the kustomize base (rendered here the
way kustomize does for our features, each resource validated strictly against the Kubernetes 1.33
OpenAPI schemas bundled in `kubernetes-validate`); then checks, against deploy/lab.toml and
`neuroarcade.cli.app`: every service the config names exists in compose and k8s, endpoints and ports
agree, every container command and probe is a valid invocation of our CLI (parsed by the real click /
argparse parsers with the config's defaults applied), key paths are mounted, images agree.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from typer._click import core as click, exceptions as click_errors  # typer vendors its own click
from typer.core import TyperGroup
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
CONFIG_PATH = "/etc/neuroarcade/lab.toml"
KEYS = "/etc/neuroarcade/keys"
K8S_VERSION = "1.33.0"
OUR_IMAGE_REPO = "neuroarcade"
# services the config does not name: the model servers, named by the agents' `server` URLs
MODEL_SERVERS = ("vllm-vlm", "vllm-lam")


# --- loading ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lab() -> dict:
    return tomllib.loads((DEPLOY / "lab.toml").read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def render_kustomize(folder: Path) -> list[dict]:
    """Our kustomization's features: resources, namespace, labels, configMapGenerator (no name hash)."""
    kz = yaml.safe_load((folder / "kustomization.yaml").read_text())
    docs: list[dict] = []
    for res in kz["resources"]:
        docs += [d for d in yaml.safe_load_all((folder / res).read_text()) if d]
    for gen in kz.get("configMapGenerator", []):
        data = {}
        for spec in gen["files"]:
            key, _, path = spec.partition("=")
            data[key] = (folder / path).read_text()
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data})
    extra_labels = {k: v for entry in kz.get("labels", []) for k, v in entry["pairs"].items()}
    for d in docs:
        if d["kind"] != "Namespace" and kz.get("namespace"):
            d["metadata"]["namespace"] = kz["namespace"]
        d["metadata"].setdefault("labels", {}).update(extra_labels)
    return docs


@pytest.fixture(scope="module")
def k8s() -> list[dict]:
    return render_kustomize(K8S)


def deployments(k8s: list[dict]) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in k8s if d["kind"] == "Deployment"}


def services(k8s: list[dict]) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in k8s if d["kind"] == "Service"}


def our_services(compose: dict) -> dict[str, dict]:
    return {n: s for n, s in compose["services"].items() if s["image"].split(":")[0] == OUR_IMAGE_REPO}


def endpoint_host_port(ep: str) -> tuple[str, int]:
    parts = urlsplit(ep)
    return parts.hostname or parts.netloc.split(":")[0], parts.port


# --- schemas -------------------------------------------------------------------------------------------


def test_compose_file_is_valid_for_the_compose_specification(compose):
    import check_jsonschema
    import jsonschema

    schema_path = Path(check_jsonschema.__file__).parent / "builtin_schemas" / "vendor" / "compose-spec.json"
    schema = json.loads(schema_path.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose)]
    assert not errors, errors
    broken = copy.deepcopy(compose)
    broken["services"]["emulator"]["healthcheck"]["intervall"] = "10s"  # the validator does catch typos
    assert list(validator.iter_errors(broken))


def test_kubernetes_resources_are_valid_for_the_api_schemas(k8s):
    import kubernetes_validate
    from kubernetes_validate.utils import ValidationError

    kinds = sorted({d["kind"] for d in k8s})
    assert kinds == ["ConfigMap", "Deployment", "Namespace", "PersistentVolumeClaim", "Service"]
    for doc in k8s:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    broken = copy.deepcopy(deployments(k8s)["emulator"])
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}  # typo: strict mode refuses it
    with pytest.raises(ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) not installed")
def test_kustomize_itself_renders_the_same_resources(k8s):
    out = subprocess.run(["kubectl", "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(K8S)],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    rendered = [d for d in yaml.safe_load_all(out) if d]
    def names(docs):  # kustomize appends a content hash to generated ConfigMap names
        return sorted((d["kind"], re.sub(r"-[a-z0-9]{10}$", "", d["metadata"]["name"])) for d in docs)

    assert names(rendered) == names(k8s)
    lab_cm = next(d for d in rendered if d["kind"] == "ConfigMap")
    assert lab_cm["data"]["lab.toml"] == (DEPLOY / "lab.toml").read_text()


# --- Dockerfiles -----------------------------------------------------------------------------------------


def _instructions(path: Path):
    import dockerfile

    return dockerfile.parse_file(str(path))


def test_image_definition_matches_the_package():
    cmds = _instructions(DEPLOY / "Dockerfile")
    args = dict(c.value[0].split("=", 1) for c in cmds if c.cmd == "ARG" and "=" in c.value[0])
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    # Python version admitted by requires-python
    assert args["PYTHON_VERSION"] == "3.11" and pyproject["project"]["requires-python"] == ">=3.11"
    # the torch pin is the Makefile's
    assert f"torch=={args['TORCH_VERSION']}" in (ROOT / "Makefile").read_text()
    extras = set(pyproject["project"]["optional-dependencies"])
    assert set(args["EXTRAS"].split(",")) <= extras
    # every package the build includes is copied into the image, and every copied path exists
    copied = {c.value[0].rstrip("/") for c in cmds if c.cmd == "COPY"} | {
        v for c in cmds if c.cmd == "COPY" for v in c.value[:-1]}
    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {p.rstrip("*") for p in include} <= {c.rstrip("/") for c in copied}
    for src in copied:
        assert (ROOT / src).exists(), f"COPY {src}: no such path in the repository"
    entry = next(c for c in cmds if c.cmd == "ENTRYPOINT")
    assert entry.json and list(entry.value) == ["neuroarcade"]
    assert pyproject["project"]["scripts"]["neuroarcade"] == "neuroarcade.cli:app"
    env = {k: v for c in cmds if c.cmd == "ENV" for k, v in zip(c.value[::2], c.value[1::2])}
    assert env["NEUROARCADE_CONFIG"] == CONFIG_PATH


def test_image_user_and_ports_match_the_deployments(lab, compose, k8s):
    cmds = _instructions(DEPLOY / "Dockerfile")
    user = next(c for c in cmds if c.cmd == "USER").value[0]
    exposed = {int(p) for c in cmds if c.cmd == "EXPOSE" for p in c.value}
    for name, dep in deployments(k8s).items():
        spec = dep["spec"]["template"]["spec"]
        c = spec["containers"][0]
        if c["image"].split(":")[0] == OUR_IMAGE_REPO:
            assert str(spec["securityContext"]["runAsUser"]) == user, name
            assert {p["containerPort"] for p in c["ports"]} <= exposed, name
    for name, svc in our_services(compose).items():
        published = {int(p.split(":")[-1]) for p in svc.get("ports", [])}
        assert published <= exposed, name


def test_vllm_image_adds_only_the_worker_extension():
    cmds = _instructions(DEPLOY / "vllm" / "Dockerfile")
    copied = [v for c in cmds if c.cmd == "COPY" for v in c.value[:-1]]
    for src in copied:
        assert (ROOT / src).is_file(), src
    # the worker module must import nothing else of ours (only it is copied into the vLLM image)
    source = (ROOT / "agents" / "vllm_worker.py").read_text()
    ours = re.findall(r"^\s*(?:from|import)\s+(protocols|services|encoders|neuroarcade|agents)\b[.\w]*", source, re.M)
    assert not ours, f"agents/vllm_worker.py imports {ours}: copy those into deploy/vllm/Dockerfile too"
    env = {k: v for c in cmds if c.cmd == "ENV" for k, v in zip(c.value[::2], c.value[1::2])}
    assert env["PYTHONPATH"] == "/opt/neuroarcade" and env["VLLM_SERVER_DEV_MODE"] == "1"
    base = next(c.value[0] for c in cmds if c.cmd == "ARG" and c.value[0].startswith("VLLM_IMAGE="))
    assert base.split("=", 1)[1].startswith("vllm/vllm-openai:")


# --- config ↔ compose ↔ k8s ---------------------------------------------------------------------------


def named_services(lab: dict) -> list[str]:
    names = [lab["pipeline"]["game"]["service"], lab["pipeline"]["scanner"]["service"], lab["pipeline"]["encoder"]["service"], lab["pipeline"]["dashboard"]["service"]]
    names += [a["service"] for a in lab["pipeline"]["agents"]]
    return names


def test_every_service_the_config_names_exists_in_compose_and_k8s(lab, compose, k8s):
    names = named_services(lab)
    assert len(names) == len(set(names))
    deps, svcs = deployments(k8s), services(k8s)
    for name in names:
        assert name in compose["services"], f"{name} missing from compose.yaml"
        assert name in deps and name in svcs, f"{name} missing from deploy/k8s"
    # and nothing runs that the config does not describe (model servers are named by the agents' URLs)
    servers = {endpoint_host_port(a["server"])[0] for a in lab["pipeline"]["agents"] if "server" in a}
    assert servers == set(MODEL_SERVERS)
    assert set(deps) == set(names) | servers
    compose_names = {n.removesuffix("-cpu") for n in compose["services"]}
    assert compose_names == set(names) | servers


def container_argv_compose(svc: dict) -> list[str]:
    return list(svc["command"])


def container_argv_k8s(dep: dict) -> list[str]:
    return list(dep["spec"]["template"]["spec"]["containers"][0]["args"])


def cli_root():
    import typer

    from neuroarcade.cli import app

    return typer.main.get_command(app)


def effective_options(argv: list[str], lab: dict) -> tuple[str, dict]:
    """Parse `neuroarcade ARGV` as the container runs it (config from NEUROARCADE_CONFIG = lab.toml).

    Returns (command path, parameter values). Raises click/argparse errors for invalid invocations.
    """
    from neuroarcade.commands import deploy, encoding
    from neuroarcade.config import default_map

    root = cli_root()
    defaults = default_map(lab)
    ctx = click.Context(root, info_name="neuroarcade", default_map=defaults)
    name, args, cmd = argv[0], argv[1:], root.get_command(ctx, argv[0])
    assert cmd is not None, f"`neuroarcade {name}` is not a command"
    path = name
    while isinstance(cmd, TyperGroup):
        sub = cmd.get_command(ctx, args[0])
        assert sub is not None, f"`neuroarcade {path} {args[0]}` is not a command"
        ctx = cmd.make_context(path, [args[0]], parent=ctx, resilient_parsing=True)
        path, name, cmd, args = f"{path} {args[0]}", args[0], sub, args[1:]
    argparse_commands = {"fit": encoding._fit_parser, **{k: (lambda p=p: p) for k, p in deploy.parsers().items()}}
    if path in argparse_commands:
        parser = argparse_commands[path]()
        table = defaults.get(path, {})
        parser.set_defaults(**table)
        for a in parser._actions:
            if a.dest in table:
                a.required = False
        try:
            return path, vars(parser.parse_args(args))
        except SystemExit as e:
            raise click_errors.UsageError(f"`neuroarcade {path} {' '.join(args)}` is not a valid invocation") from e
    sub_ctx = cmd.make_context(name, list(args), parent=ctx)
    return path, dict(sub_ctx.params)


def all_invocations(compose: dict, k8s: list[dict]) -> list[tuple[str, list[str]]]:
    """(where, argv after `neuroarcade`) of every container command and health probe that runs our CLI."""
    out = []
    for name, svc in our_services(compose).items():
        out.append((f"compose {name}", container_argv_compose(svc)))
        test = svc["healthcheck"]["test"]
        assert test[:2] == ["CMD", "neuroarcade"], f"compose {name}: healthcheck must run our CLI"
        out.append((f"compose {name} healthcheck", list(test[2:])))
    for name, dep in deployments(k8s).items():
        c = dep["spec"]["template"]["spec"]["containers"][0]
        if c["image"].split(":")[0] != OUR_IMAGE_REPO:
            continue
        out.append((f"k8s {name}", container_argv_k8s(dep)))
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            if probe in c:
                cmd = c[probe]["exec"]["command"]
                assert cmd[0] == "neuroarcade", f"k8s {name} {probe}"
                out.append((f"k8s {name} {probe}", list(cmd[1:])))
    return out


@pytest.mark.slow
def test_every_container_command_and_probe_is_a_valid_cli_invocation(lab, compose, k8s):
    invocations = all_invocations(compose, k8s)
    assert len(invocations) >= 20
    for where, argv in invocations:
        try:
            effective_options(argv, lab)
        except Exception as e:  # click_errors.UsageError / BadParameter / argparse errors
            pytest.fail(f"{where}: `neuroarcade {' '.join(argv)}`: {e}")


def test_the_checker_rejects_invalid_invocations(lab):
    with pytest.raises(click_errors.UsageError):
        effective_options(["emulator", "--no-such-option", "1"], lab)
    with pytest.raises(click_errors.BadParameter):
        effective_options(["health", "--endpoint", "tcp://x:1", "--timeout", "soon"], lab)
    with pytest.raises(AssertionError):
        effective_options(["no-such-command"], lab)
    with pytest.raises(click_errors.UsageError):
        effective_options(["extract", "--recordings", "a.narec", "--stride", "x"], lab)


def test_every_config_table_option_exists_on_its_command(lab, tmp_path):
    """Click ignores unknown default_map keys silently: a typo in lab.toml would be lost. The CLI's own
    check (neuroarcade.config.check_command_tables, run by `neuroarcade --config`) must pass lab.toml and
    catch a typo; the argparse-backed commands (extract, fit-subjects) check their tables themselves."""
    from typer.testing import CliRunner

    from neuroarcade.cli import app
    from neuroarcade.commands import deploy
    from neuroarcade.config import ConfigError, check_command_tables, default_map

    root = cli_root()
    ctx = click.Context(root, info_name="neuroarcade")
    defaults = default_map(lab)
    check_command_tables(defaults, root, ctx)  # raises ConfigError on an unknown table or key
    for command, parser in deploy.parsers().items():
        if command in defaults:  # the same check those commands run on their table (deploy._parse)
            required = [a.option_strings[0] for a in parser._actions if a.required and a.dest not in defaults[command]]
            deploy._parse(parser, [arg for opt in required for arg in (opt, "x")], defaults[command])

    # the check is not vacuous: a wrong key, a wrong table, a wrong nested table
    for bad, message in ((lambda c: c["emulator"].update(gmae="ALE/Pong-v5"), r"\[emulator\]: no option gmae"),
                         (lambda c: c.update(emulater={"game": "x"}), r"\[emulater\] names no neuroarcade command"),
                         (lambda c: c.update(bench={"transport": {"frame": 5}}),
                          r"\[bench.transport\]: no option frame")):
        broken = copy.deepcopy(lab)
        bad(broken)
        with pytest.raises(ConfigError, match=message):
            check_command_tables(default_map(broken), root, ctx)
    broken = copy.deepcopy(lab)
    broken.setdefault("extract", {})["stirde"] = 2
    with pytest.raises(SystemExit):
        deploy._parse(deploy.parsers()["extract"], ["--recordings", "a", "--out", "o"], default_map(broken)["extract"])

    # and the CLI runs it: lab.toml is accepted, the typo refused with its name
    ok = CliRunner(env={"NEUROARCADE_CONFIG": None}).invoke(app, ["--config", str(DEPLOY / "lab.toml"), "health",
                                                                  "--help"])
    assert ok.exit_code == 0, ok.output
    typo = tmp_path / "typo.toml"
    typo.write_text((DEPLOY / "lab.toml").read_text() + '\n[dashbaord]\nport = 1\n')
    refused = CliRunner(env={"NEUROARCADE_CONFIG": None}).invoke(app, ["--config", str(typo), "health", "--help"])
    words = " ".join(refused.output.replace("│", " ").split())  # rich wraps the message in a box
    assert refused.exit_code == 2 and "[dashbaord] names no neuroarcade command" in words, refused.output


def bound_ports(argv: list[str], lab: dict) -> dict[str, int]:
    """Ports a container binds, from its effective options (bind endpoints tcp://*:P, HTTP --port)."""
    path, opts = effective_options(argv, lab)
    ports = {}
    for key, value in opts.items():
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, str) and v.startswith("tcp://*:"):
                ports[key] = int(v.rsplit(":", 1)[1])
    if path == "dashboard":
        ports["port"] = opts["port"]
    return ports


def connect_endpoints(lab: dict, compose: dict, k8s: list[dict]) -> list[tuple[str, str]]:
    """(where, endpoint) of every endpoint that names a host: pipeline tables, command tables, container args."""
    found = []

    def walk(where, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{where}.{k}", v)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(f"{where}[{i}]", v)
        elif isinstance(value, str) and re.match(r"^(tcp|http)://", value) and "*" not in value:
            found.append((where, value))

    walk("lab.toml", lab)
    for name, svc in our_services(compose).items():
        walk(f"compose {name}", container_argv_compose(svc))
    for name, dep in deployments(k8s).items():
        if dep["spec"]["template"]["spec"]["containers"][0]["image"].split(":")[0] == OUR_IMAGE_REPO:
            walk(f"k8s {name}", container_argv_k8s(dep))
    return found


def test_endpoints_and_ports_agree_everywhere(lab, compose, k8s):
    deps, svcs = deployments(k8s), services(k8s)
    # ports each of our services binds, from its command + config, the same in compose and k8s
    binds: dict[str, set[int]] = {}
    for name, svc in our_services(compose).items():
        compose_ports = set(bound_ports(container_argv_compose(svc), lab).values())
        k8s_ports = set(bound_ports(container_argv_k8s(deps[name]), lab).values())
        assert compose_ports == k8s_ports and compose_ports, name
        binds[name] = compose_ports
        container = deps[name]["spec"]["template"]["spec"]["containers"][0]
        assert {p["containerPort"] for p in container["ports"]} == compose_ports, f"k8s {name} containerPorts"
        assert {p["port"] for p in svcs[name]["spec"]["ports"]} == compose_ports, f"k8s Service {name} ports"
        named = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert all(named[p["targetPort"]] == p["port"] for p in svcs[name]["spec"]["ports"]), name
        published = {int(p.split(":")[-1]) for p in svc.get("ports", [])}
        assert published <= compose_ports, f"compose {name} publishes a port it does not bind"
    for name in MODEL_SERVERS:
        args = deps[name]["spec"]["template"]["spec"]["containers"][0]["args"]
        binds[name] = {int(args[args.index("--port") + 1])}
        assert {p["port"] for p in svcs[name]["spec"]["ports"]} == binds[name]
        for variant in (name, f"{name}-cpu"):
            cmd = compose["services"][variant]["command"]
            assert int(cmd[cmd.index("--port") + 1]) in binds[name]
    # every endpoint anyone connects to names one of these services and a port it binds
    endpoints = connect_endpoints(lab, compose, k8s)
    assert len(endpoints) >= 15
    for where, ep in endpoints:
        host, port = endpoint_host_port(ep)
        assert host in binds, f"{where}: {ep} names no service"
        assert port in binds[host], f"{where}: {ep}: {host} binds {sorted(binds[host])}, not {port}"
    # the pipeline tables agree with the command tables the containers actually use
    assert lab["agent"]["frames"] == lab["pipeline"]["game"]["frames"] and lab["agent"]["control"] == lab["pipeline"]["game"]["control"]
    assert lab["emulator"]["game"] == lab["agent"]["game"] == lab["pipeline"]["game"]["game"]
    assert sorted(lab["encode"]["activations"]) == sorted(a["activations"] for a in lab["pipeline"]["agents"])
    assert lab["encode"]["bold"] == [lab["pipeline"]["scanner"]["bold"]]
    assert lab["encode"]["weights"] == lab["pipeline"]["encoder"]["weights"]


def test_containers_run_the_agents_and_scanner_the_config_describes(lab, compose, k8s):
    deps = deployments(k8s)
    for agent in lab["pipeline"]["agents"]:
        name = agent["service"]
        for where, argv in ((f"compose {name}", container_argv_compose(compose["services"][name])),
                            (f"k8s {name}", container_argv_k8s(deps[name]))):
            _, opts = effective_options(argv, lab)
            assert opts["kind"] == agent["kind"] and opts["agent_id"] == agent["agent_id"], where
            assert opts["role"] == agent["role"], where
            if agent["kind"] == "vlm":
                assert opts["model"] == agent["model"], where
                assert opts["conditions"].split(",") == agent["conditions"], where
    for where, argv in (("compose", container_argv_compose(compose["services"]["scanner"])),
                        ("k8s", container_argv_k8s(deps["scanner"]))):
        _, opts = effective_options(argv, lab)
        assert opts["source"] == lab["pipeline"]["scanner"]["source"] and str(opts["folder"]) == lab["pipeline"]["scanner"]["folder"], where
        assert endpoint_host_port(opts["endpoint"])[1] == endpoint_host_port(lab["pipeline"]["scanner"]["bold"])[1], where
    for where, argv in (("compose", container_argv_compose(compose["services"]["dashboard"])),
                        ("k8s", container_argv_k8s(deps["dashboard"]))):
        _, opts = effective_options(argv, lab)
        assert opts["frames"] == lab["pipeline"]["game"]["frames"] and opts["control"] == lab["pipeline"]["game"]["control"], where
        assert sorted(opts["activations"]) == sorted(a["activations"] for a in lab["pipeline"]["agents"]), where
        assert list(opts["bold"]) == [lab["pipeline"]["scanner"]["bold"]], where
        assert list(opts["predictions"]) == [lab["pipeline"]["encoder"]["predictions"]], where
        assert f"http://{lab['pipeline']['dashboard']['service']}:{opts['port']}" == lab["pipeline"]["dashboard"]["url"], where


# --- keys, config mounts, images ----------------------------------------------------------------------


def test_config_and_curve_keys_are_mounted_where_the_config_says(lab, compose, k8s):
    from neuroarcade.config import default_map

    key_paths = {v for table in default_map(lab).values() for k, v in table.items() if k.startswith("curve_")}
    assert key_paths == {f"{KEYS}/self.key_secret", f"{KEYS}/public"}
    deps = deployments(k8s)
    for name, svc in our_services(compose).items():
        assert svc["environment"]["NEUROARCADE_CONFIG"] == CONFIG_PATH, name
        assert {"source": "lab", "target": CONFIG_PATH} in svc["configs"], name
        assert compose["configs"]["lab"]["file"] == "./lab.toml"
        assert f"./keys/public:{KEYS}/public:ro" in svc["volumes"], name
        secret = next(s for s in svc["secrets"] if s["target"] == f"{KEYS}/self.key_secret")
        assert compose["secrets"][secret["source"]]["file"] == f"./keys/{name}.key_secret", name

        spec = deps[name]["spec"]["template"]["spec"]
        c = spec["containers"][0]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["NEUROARCADE_CONFIG"] == CONFIG_PATH, name
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        cfg = mounts[CONFIG_PATH]
        assert cfg["subPath"] == "lab.toml" and volumes[cfg["name"]]["configMap"]["name"] == "neuroarcade-lab"
        own = mounts[f"{KEYS}/self.key_secret"]
        assert volumes[own["name"]]["secret"]["secretName"] == f"neuroarcade-curve-{name}"
        assert volumes[mounts[f"{KEYS}/public"]["name"]]["configMap"]["name"] == "neuroarcade-curve-public"
    # ZeroMQ probes authenticate with the probed service's public key; the config gives them our key pair
    assert lab["health"]["curve_secret"] == f"{KEYS}/self.key_secret"
    for where, argv in all_invocations(compose, k8s):
        if argv[0] != "health":
            continue
        _, opts = effective_options(argv, lab)
        if opts["check"] == "http":
            continue
        service = where.split()[1]
        assert opts["curve_server"] == f"{KEYS}/public/{service}.key", where
        assert endpoint_host_port(opts["endpoint"])[0] == "127.0.0.1", where


def test_services_that_take_curve_options_get_them(lab, compose):
    """Each command that has CURVE options (more gain them as the security work lands) is given them."""
    for name, svc in our_services(compose).items():
        argv = container_argv_compose(svc)
        _, opts = effective_options(argv, lab)
        for key in [k for k in opts if k.startswith("curve_")]:
            assert opts[key], f"compose {name}: `{argv[0]}` talks off loopback but its {key} is not set (lab.toml)"


def test_images_are_consistent(compose, k8s):
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    ours = our_services(compose)
    assert {s["image"] for s in ours.values()} == {f"{OUR_IMAGE_REPO}:{version}"}
    assert all(s["build"]["dockerfile"] == "deploy/Dockerfile" for s in ours.values())
    kz = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    tags = {i["name"]: i["newTag"] for i in kz["images"]}
    assert tags[OUR_IMAGE_REPO] == version
    vllm_images = set()
    for name, dep in deployments(k8s).items():
        image = dep["spec"]["template"]["spec"]["containers"][0]["image"]
        repo, tag = image.split(":")
        assert tags[repo] == tag, name
        if repo != OUR_IMAGE_REPO:
            vllm_images.add(image)
    compose_vllm = {compose["services"][n]["image"] for n in MODEL_SERVERS}
    assert vllm_images == compose_vllm
    vllm_tag = next(iter(vllm_images)).split(":")[1]
    vllm_base = next(c.value[0] for c in _instructions(DEPLOY / "vllm" / "Dockerfile")
                     if c.cmd == "ARG" and c.value[0].startswith("VLLM_IMAGE="))
    assert vllm_base.endswith(f":v{vllm_tag}"), "vLLM base image and our vLLM image tag disagree"
    for n in MODEL_SERVERS:
        cpu = compose["services"][f"{n}-cpu"]
        assert cpu["build"]["args"]["VLLM_IMAGE"] == f"vllm/vllm-openai-cpu:v{vllm_tag}"
        assert cpu["networks"]["default"]["aliases"] == [n]


def test_model_servers_run_the_backend_s_serve_command(lab, compose, k8s):
    """The vLLM servers get the flags agents.vllm_backend.serve_command gives (hooks need them)."""
    vllm_backend = pytest.importorskip("agents.vllm_backend")

    def flags(argv: list[str]) -> dict[str, str | None]:
        out, i = {}, 0
        while i < len(argv):
            if argv[i].startswith("--"):
                nxt = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else None
                out[argv[i]] = nxt
                i += 2 if nxt is not None else 1
            else:
                i += 1
        return out

    models = {endpoint_host_port(a["server"])[0]: a["model"] for a in lab["pipeline"]["agents"] if "server" in a}
    deps = deployments(k8s)
    for name, model in models.items():
        servers = ((f"k8s {name}", deps[name]["spec"]["template"]["spec"]["containers"][0]["args"], "bfloat16"),
                   (f"compose {name}", compose["services"][name]["command"], "bfloat16"),
                   (f"compose {name}-cpu", compose["services"][f"{name}-cpu"]["command"], "float32"))
        for where, argv, dtype in servers:
            ours = flags(list(argv))
            util = float(ours["--gpu-memory-utilization"])
            cfg = vllm_backend.VllmConfig(model=model, dtype=dtype, gpu_memory_utilization=util)
            expected = flags(vllm_backend.serve_command(cfg, "0.0.0.0", 8000, python="python3")[3:])
            for flag in ("--limit-mm-per-prompt", "--mm-processor-kwargs"):  # JSON: compare parsed
                if flag in expected:
                    assert json.loads(ours.pop(flag)) == json.loads(expected.pop(flag)), f"{where}: {flag}"
            assert ours == expected, f"{where}: vLLM flags differ from serve_command"
