"""compose.yaml's stack, natively: `scripts/stack.sh up|down|status|env|plan [SERVICE...]`.

compose.yaml is the one description of the stack; this script reads it (and the Dockerfile) and
runs each service on this machine with the service's own command, environment, port and health
check, in `depends_on` order:

- a service built from the Dockerfile runs its stage's ENTRYPOINT + CMD (or the service's own
  `entrypoint`/`command`) with the stage's ENV and the service's `environment`, the project's
  venv first on PATH, in the repository (the image's WORKDIR);
- a service from a third-party image runs a native stand-in: `postgres` is the machine's
  PostgreSQL (it must be the image's major version; the init scripts mounted into the image run
  against it), `minio/minio` is moto's standalone S3 server on MinIO's port, and the `minio/mc`
  bucket job creates the same bucket with boto3.

What differs from a container is translated, never rewritten by hand: a service's name in a URL
(`http://mlflow:5000`) becomes 127.0.0.1, a bind to 0.0.0.0 becomes the published address
(127.0.0.1), container paths of volumes become folders under `.workbench/stack/`. A service runs
on its published port, so compose must publish each port on the same number it listens on.

Variables come as compose takes them: this process's environment, then `.env` (else
`.env.example`, with a note); `${VAR:?message}` stops with the message.

    scripts/stack.sh up [SERVICE...]   start these (default: all) and what they depend on; jobs run
                                       to completion in the foreground; returns when all are healthy
    scripts/stack.sh down              stop everything this script started (the machine's PostgreSQL stays)
    scripts/stack.sh status            each service: running/healthy, a job's exit code, or down
    scripts/stack.sh logs SERVICE      the last lines a service wrote (-n LINES)
    scripts/stack.sh env [--tests]     export lines pointing a shell (or the test suite) at the stack
    scripts/stack.sh plan [--json]     what `up` would run, per service
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from models.errors import ExitCode

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
LOOPBACK = "127.0.0.1"

# Third-party images and what stands in for them here (by image repository, any tag).
STAND_INS = {
    "postgres": "the machine's PostgreSQL server (same major version), init scripts run with psql",
    "minio/minio": "moto's standalone S3 server (moto_server) on MinIO's S3 port, no console; `down` saves its "
                   "objects to the volume's folder and `up` loads them back",
    "minio/mc": "the bucket created with boto3 against the S3 endpoint",
}


class StackError(Exception):
    """A problem in compose.yaml, .env or the machine, reported as one line."""


# --------------------------------------------------------------------------- variables

def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (comments, blank lines and `export ` ignored; quotes removed)."""
    values = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ")
        if "=" not in line:
            raise StackError(f"{path.name}:{number}: expected KEY=VALUE, got {line!r}")
        key, value = line.split("=", 1)
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        else:  # as compose reads it: ` # ...` after an unquoted value is a comment
            value = re.split(r"\s+#", value, maxsplit=1)[0]
        values[key.strip()] = value
    return values


def project_variables(environ: dict[str, str] | None = None, root: Path = ROOT) -> tuple[dict[str, str], str]:
    """The variables compose would interpolate with, and where they came from."""
    environ = dict(os.environ if environ is None else environ)
    for name in (".env", ".env.example"):
        if (root / name).is_file():
            return {**read_env_file(root / name), **environ}, name
    return environ, "the environment only"


def interpolate(value: str, variables: dict[str, str], where: str) -> str:
    """Compose's interpolation ($$, $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR?err}):
    the study configs' interpolator, with an unset plain variable read as empty, as compose does."""
    return interpolate_tree(value, variables, where)


def interpolate_tree(node, variables: dict[str, str], where: str = "compose.yaml"):
    from models.errors import ConfigError
    from studies.config.interpolation import interpolate as interpolate_yaml

    try:
        return interpolate_yaml(node, where, environ=variables, strict=False)
    except ConfigError as e:
        raise StackError(str(e)) from None


# --------------------------------------------------------------------------- Dockerfile

@dataclass
class Stage:
    name: str
    base: str
    env: dict[str, str] = field(default_factory=dict)
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    workdir: str = "/"
    user: str = "root"


def read_dockerfile(path: Path = DOCKERFILE) -> dict[str, Stage]:
    """Stages by name with their ENV, ENTRYPOINT, CMD, WORKDIR and USER (exec form only)."""
    text = re.sub(r"\\\n", " ", path.read_text())
    stages: dict[str, Stage] = {}
    stage = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        word, rest = word.upper(), rest.strip()
        if word == "FROM":
            parts = rest.split()
            base = parts[0]
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else f"stage{len(stages)}"
            stage = stages[name] = Stage(name, base)
            if base in stages:  # FROM an earlier stage inherits its settings
                inherited = stages[base]
                stage.env, stage.entrypoint, stage.cmd = dict(inherited.env), inherited.entrypoint, inherited.cmd
                stage.workdir, stage.user = inherited.workdir, inherited.user
        elif stage is None:
            continue
        elif word == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                stage.env[key] = value
        elif word in ("ENTRYPOINT", "CMD"):
            if not rest.startswith("["):
                raise StackError(f"Dockerfile: {word} of stage {stage.name} must use the exec form [\"...\"]")
            value = json.loads(rest)
            if word == "ENTRYPOINT":
                stage.entrypoint, stage.cmd = value, []
            else:
                stage.cmd = value
        elif word == "WORKDIR":
            stage.workdir = rest
        elif word == "USER":
            stage.user = rest
    return stages


# --------------------------------------------------------------------------- services

@dataclass
class Port:
    address: str
    published: int
    target: int


@dataclass
class Service:
    name: str
    kind: str                         # "build" (our Dockerfile) or "stand-in" (a third-party image)
    source: str                       # Dockerfile target or image
    job: bool                         # something waits for it to complete successfully
    argv: list[str]                   # the native command (stand-ins: what the container runs)
    env: dict[str, str]               # the native environment (build: stage ENV + service environment)
    ports: list[Port]
    healthcheck: list[str] | None     # the native health-check command (argv), None if the service has none
    health_seconds: float             # how long `up` waits for a healthy state
    depends_on: dict[str, str]        # service -> condition
    stand_in: str = ""
    volumes: dict[str, str] = field(default_factory=dict)  # container path -> native path
    stop_seconds: float = 10.0        # stop_grace_period: SIGTERM, then SIGKILL after this long

    @property
    def image(self) -> str:
        """The third-party image repository a stand-in replaces (e.g. "minio/minio"), else ""."""
        return _repository(self.source) if self.kind == "stand-in" else ""


def _as_argv(value) -> list[str]:
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def _environment(raw, variables: dict[str, str]) -> dict[str, str]:
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) if "=" in item else (item, None) for item in raw)
    out = {}
    for key, value in (raw or {}).items():
        if value is None:  # `KEY:` with no value passes the variable through
            if key in variables:
                out[key] = variables[key]
        else:
            out[key] = str(value).lower() if isinstance(value, bool) else str(value)
    return out


def _duration(text: str | None, default: float) -> float:
    if not text:
        return default
    total = 0.0
    for number, unit in re.findall(r"([\d.]+)(ms|us|s|m|h)", str(text)):
        total += float(number) * {"us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}[unit]
    return total


def _ports(raw: list, where: str) -> list[Port]:
    ports = []
    for item in raw or []:
        if isinstance(item, dict):
            address, published, target = item.get("host_ip", "0.0.0.0"), item.get("published"), item["target"]
        else:
            parts = str(item).split("/")[0].split(":")
            if len(parts) == 3:
                address, published, target = parts
            elif len(parts) == 2:
                address, (published, target) = "0.0.0.0", parts
            else:
                address, published, target = "0.0.0.0", parts[0], parts[0]
        if published is None or int(published) != int(target):
            raise StackError(f"{where}: port {item!r}: publish it on the port it listens on (natively there is no mapping)")
        ports.append(Port(str(address), int(published), int(target)))
    return ports


class Translator:
    """Container view -> native view: service host names, 0.0.0.0 binds and volume paths."""

    def __init__(self, names: list[str], volumes: dict[str, str]) -> None:
        alternatives = "|".join(map(re.escape, names))
        # a service name used as a host: after //, @, a comma, a quote, a blank or at the start; before :PORT
        self.hosts = re.compile(rf"(?:(?<=[/@,\s\"'])|^)(?:{alternatives})(?=:\d+(?:[/,\s\"']|$))")
        self.names = re.compile(alternatives)
        self.volumes = volumes

    def __call__(self, value: str, key: str = "") -> str:
        if key.endswith(("HOST", "HOSTNAME")) and self.names.fullmatch(value):  # PGHOST=postgres
            return LOOPBACK
        value = self.hosts.sub(LOOPBACK, value).replace("0.0.0.0", LOOPBACK)
        for container, native in sorted(self.volumes.items(), key=lambda kv: -len(kv[0])):
            if value == container or value.startswith(container + "/"):
                return native + value[len(container):]
            value = re.sub(rf"(?<=[=\s\"']){re.escape(container)}(?=[/\s\"']|$)", native, value)
        return value


def load_services(variables: dict[str, str], *, compose_file: Path = COMPOSE_FILE, dockerfile: Path = DOCKERFILE,
                  state: Path | None = None) -> dict[str, Service]:
    """Every compose service as it runs natively, in start order."""
    import yaml

    state = state or default_state()
    compose = interpolate_tree(yaml.safe_load(compose_file.read_text()), variables)
    raw_services = enabled_services(compose.get("services") or {}, variables)
    stages = read_dockerfile(dockerfile)
    names = list(raw_services)
    services: dict[str, Service] = {}
    for name, spec in raw_services.items():
        where = f"compose.yaml services.{name}"
        depends = _depends(spec)
        for dep in depends:
            if dep not in raw_services:
                raise StackError(f"{where}.depends_on: no service named {dep!r}")
        job = any(_depends(other).get(name) == "service_completed_successfully" for other in raw_services.values())
        volumes = _volumes(spec, state)
        if "build" in spec:
            build = spec["build"] if isinstance(spec["build"], dict) else {"context": spec["build"]}
            target = build.get("target") or list(stages)[-1]
            if target not in stages:
                raise StackError(f"{where}.build.target: the Dockerfile has no stage {target!r} (stages: {', '.join(stages)})")
            stage = stages[target]
            mapping = {stage.workdir: str(ROOT), **volumes}
            tr = Translator(names, mapping)
            entrypoint = _as_argv(spec["entrypoint"]) if "entrypoint" in spec else stage.entrypoint
            command = _as_argv(spec["command"]) if "command" in spec else ([] if "entrypoint" in spec else stage.cmd)
            env = {k: tr(v, k) for k, v in {**stage.env, **_environment(spec.get("environment"), variables)}.items()
                   if k != "PATH"}
            argv = [tr(a) for a in entrypoint + command]
            kind, source, stand_in = "build", target, ""
        else:
            image = str(spec.get("image", ""))
            repo = _repository(image)
            if repo not in STAND_INS:
                raise StackError(f"{where}.image: no native stand-in for {image!r} (known: {', '.join(STAND_INS)})")
            tr = Translator(names, volumes)
            env = {k: tr(v, k) for k, v in _environment(spec.get("environment"), variables).items()}
            argv = [tr(a) for a in _as_argv(spec.get("entrypoint")) + _as_argv(spec.get("command"))]
            kind, source, stand_in = "stand-in", image, STAND_INS[repo]
            mapping = volumes
        check, seconds = _healthcheck(spec.get("healthcheck") or {}, tr)
        services[name] = Service(name, kind, source, job, argv, env, _ports(spec.get("ports"), where), check,
                                 seconds, depends, stand_in, mapping, _duration(spec.get("stop_grace_period"), 10.0))
    return {n: services[n] for n in start_order(services)}


def _repository(image: str) -> str:
    """An image name without its tag: minio/minio:RELEASE.x -> minio/minio."""
    return image.rsplit(":", 1)[0] if ":" in image.split("/")[-1] else image


def _volumes(spec: dict, state: Path) -> dict[str, str]:
    """Container path -> native path: a bind mount is the repository's folder, a named volume a
    folder under the state directory."""
    mapping = {}
    for item in spec.get("volumes") or []:
        source, _, rest = str(item).partition(":")
        target = rest.split(":")[0]
        mapping[target] = str((ROOT / source).resolve()) if source.startswith((".", "/")) else str(state / "volumes" / source)
    return mapping


def _healthcheck(health: dict, tr: Translator) -> tuple[list[str] | None, float]:
    """The native health-check command and how long to wait for it (start_period + interval x retries)."""
    test = _as_argv(health.get("test")) if not health.get("disable") else []
    if not test or test[0] == "NONE":
        return None, 30.0
    check = [tr(a) for a in test[1:]] if test[0] == "CMD" else ["sh", "-c", tr(" ".join(test[1:] if test[0] == "CMD-SHELL" else test))]
    seconds = _duration(health.get("start_period"), 0) + _duration(health.get("interval"), 30) * int(health.get("retries", 3))
    return check, max(seconds, 30.0)


def _depends(spec: dict) -> dict[str, str]:
    raw = spec.get("depends_on") or {}
    if isinstance(raw, list):
        return {name: "service_started" for name in raw}
    return {name: (cond or {}).get("condition", "service_started") for name, cond in raw.items()}


def enabled_services(raw: dict, variables: dict[str, str]) -> dict:
    """The services of the active profiles (COMPOSE_PROFILES), as compose enables them: a service
    without `profiles` always; a dependency on a disabled service is dropped if `required: false`."""
    active = {p.strip() for p in variables.get("COMPOSE_PROFILES", "").split(",") if p.strip()}
    enabled = {name: dict(spec) for name, spec in raw.items()
               if not spec.get("profiles") or "*" in active or active & set(spec["profiles"])}
    for name, spec in enabled.items():
        deps = spec.get("depends_on") or {}
        if isinstance(deps, list):
            deps = {d: {"condition": "service_started"} for d in deps}
        kept = {}
        for dep, cond in deps.items():
            if dep in enabled:
                kept[dep] = cond
            elif dep in raw and (cond or {}).get("required", True) is not False:
                raise StackError(f"compose.yaml services.{name}.depends_on.{dep}: {dep} is disabled by COMPOSE_PROFILES "
                                 f"({','.join(sorted(active)) or 'empty'}) and required")
        spec["depends_on"] = kept
    return enabled


def start_order(services: dict[str, Service], wanted: list[str] | None = None) -> list[str]:
    """The services `wanted` (all when empty) and everything they depend on, dependencies first."""
    unknown = [w for w in wanted or () if w not in services]
    if unknown:
        raise StackError(f"no service named {', '.join(map(repr, unknown))} in compose.yaml (services: {', '.join(services)})")
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise StackError(f"compose.yaml: depends_on forms a cycle through {name!r}")
        visiting.add(name)
        for dep in services[name].depends_on:
            visit(dep)
        visiting.discard(name)
        order.append(name)

    for name in wanted or services:
        visit(name)
    return order


# --------------------------------------------------------------------------- processes

def default_state() -> Path:
    return Path(os.environ.get("WORKBENCH_STACK_DIR", ROOT / ".workbench" / "stack")).resolve()


def venv_bin() -> Path:
    return Path(sys.executable).parent


def native_env(service: Service) -> dict[str, str]:
    """A container gets only its own environment; so does the native process (plus PATH, HOME, locale)."""
    keep = {k: os.environ[k] for k in ("HOME", "LANG", "LC_ALL", "TMPDIR", "TZ") if k in os.environ}
    return {**keep, **service.env, "PATH": f"{venv_bin()}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}"}


def port_open(port: int, host: str = LOOPBACK) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, port)) == 0


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not reaped) is not running
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except OSError:
        return True


class Stack:
    def __init__(self, services: dict[str, Service], state: Path, out=None) -> None:
        self.services, self.state, self.out = services, state, out

    # -- bookkeeping
    def pidfile(self, name: str) -> Path:
        return self.state / f"{name}.pid"

    def pid(self, name: str) -> int | None:
        try:
            pid = int(self.pidfile(name).read_text())
        except (OSError, ValueError):
            return None
        return pid if alive(pid) else None

    def exit_code(self, name: str) -> int | None:
        try:
            return int((self.state / f"{name}.exit").read_text())
        except (OSError, ValueError):
            return None

    def log(self, name: str) -> Path:
        return self.state / f"{name}.log"

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    # -- health
    def healthy(self, service: Service) -> bool:
        if service.image == "minio/minio":  # `mc ready` is not here: ask the S3 port itself
            return port_open(service.ports[0].published)
        if not service.healthcheck:
            return self.pid(service.name) is not None
        env = native_env(service)
        if service.image == "postgres":  # pg_isready against the published port
            env.update(PGHOST=LOOPBACK, PGPORT=str(service.ports[0].published) if service.ports else "5432")
        try:
            return subprocess.run(service.healthcheck, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, timeout=30).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False

    def wait_healthy(self, service: Service) -> None:
        deadline = time.monotonic() + service.health_seconds
        while time.monotonic() < deadline:
            if self.healthy(service):
                return
            pid_file = self.pidfile(service.name)
            if pid_file.exists() and self.pid(service.name) is None:
                raise StackError(f"{service.name} exited while starting{self._tail(service.name)}")
            time.sleep(1)
        raise StackError(f"{service.name} is not healthy after {service.health_seconds:.0f} s{self._tail(service.name)}")

    def _tail(self, name: str, lines: int = 20) -> str:
        log = self.log(name)
        if not log.exists():
            return ""
        text = "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
        return f" (log {log}):\n{text}"

    # -- start
    def ensure_running(self, service: Service, argv: list[str], env: dict[str, str]) -> bool:
        """Start a long-running service; one already running is kept, or restarted if its command or
        environment changed (as compose recreates a container whose configuration changed).
        Returns whether it (re)started the process."""
        spec = json.dumps({"argv": argv, "env": env}, sort_keys=True)
        spec_file = self.state / f"{service.name}.spec"
        pid = self.pid(service.name)
        if pid and spec_file.is_file() and spec_file.read_text() == spec:
            self.say(f"{service.name}: already running (pid {pid})")
            return False
        if pid:
            self.say(f"{service.name}: configuration changed; restarting")
            _stop_group(pid, service.stop_seconds)
        self.start_background(service, argv, env)
        spec_file.write_text(spec)
        self.say(f"{service.name}: started {shlex.join(argv)}  (log {self.log(service.name)})")
        return True

    def start_background(self, service: Service, argv: list[str], env: dict[str, str] | None = None) -> None:
        for port in service.ports:
            if port_open(port.published):
                raise StackError(f"{service.name}: port {port.published} is taken by a process this script did not "
                                 "start (stop it, or stop the other stack)")
        self.prepare(service)
        with open(self.log(service.name), "ab") as log:
            proc = subprocess.Popen(argv, env=env or native_env(service), cwd=ROOT, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.pidfile(service.name).write_text(str(proc.pid))

    def prepare(self, service: Service) -> None:
        """The state folder and the service's named volumes (compose creates volumes on first use)."""
        self.state.mkdir(parents=True, exist_ok=True)
        for native in service.volumes.values():
            if native.startswith(str(self.state)):
                Path(native).mkdir(parents=True, exist_ok=True)

    def run_job(self, service: Service) -> None:
        """Run a job in the foreground (its output shown and logged) and record its exit code."""
        self.prepare(service)
        self.say(f"{service.name}: running {shlex.join(service.argv)}")
        with open(self.log(service.name), "ab") as log:
            proc = subprocess.Popen(service.argv, env=native_env(service), cwd=ROOT, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
            self.pidfile(service.name).write_text(str(proc.pid))
            try:
                for line in proc.stdout:
                    log.write(line)
                    self.say(f"{service.name} | {line.decode(errors='replace').rstrip()}")
                code = proc.wait()
            except KeyboardInterrupt:
                os.killpg(proc.pid, signal.SIGTERM)
                code = proc.wait()
            finally:
                self.pidfile(service.name).unlink(missing_ok=True)
        self.completed(service, code)

    def completed(self, service: Service, code: int) -> None:
        (self.state / f"{service.name}.exit").write_text(str(code))
        if code != 0:
            raise StackError(f"{service.name} exited with {code} (log {self.log(service.name)})")

    def up(self, names: list[str]) -> None:
        for name in start_order(self.services, names):
            service = self.services[name]
            for dep, condition in service.depends_on.items():
                self.check_condition(name, dep, condition)
            if service.kind == "stand-in":
                {"postgres": self._up_postgres, "minio/minio": self._up_minio, "minio/mc": self._up_mc}[service.image](service)
            elif service.job:
                self.run_job(service)
            else:
                self.ensure_running(service, service.argv, native_env(service))
            if service.healthcheck and not service.job:
                self.wait_healthy(service)
            self.say(f"{name}: {self.describe(service)}")

    def check_condition(self, name: str, dep: str, condition: str) -> None:
        service = self.services[dep]
        if condition == "service_healthy" and not self.healthy(service):
            raise StackError(f"{name} needs {dep} healthy, and it is not")
        if condition == "service_completed_successfully" and self.exit_code(dep) != 0:
            raise StackError(f"{name} needs {dep} to have completed successfully (exit code: {self.exit_code(dep)})")

    def describe(self, service: Service) -> str:
        if service.job:
            code = self.exit_code(service.name)
            return "not run" if code is None else f"exited {code}"
        ports = service.ports[:1] if service.image == "minio/minio" else service.ports  # moto: no console
        where = ", ".join(f"{LOOPBACK}:{p.published}" for p in ports)
        external = service.image == "postgres"  # the machine's server: never started or stopped here
        if not external and self.pid(service.name) is None:
            return "down"
        if service.healthcheck or service.image == "minio/minio":
            state = "healthy" if self.healthy(service) else ("down" if external else "unhealthy")
        else:
            state = "running"
        return state + (f" on {where}" if where else "") + (" (the machine's server)" if external else "")

    # -- stand-ins
    def _up_postgres(self, service: Service) -> None:
        """The machine's PostgreSQL: started if it is down, version-checked, init scripts applied."""
        port = service.ports[0].published if service.ports else 5432
        env = {**os.environ, "PGHOST": LOOPBACK, "PGPORT": str(port)}
        if not self.healthy(service) and shutil.which("pg_ctlcluster") and Path("/etc/postgresql").is_dir():
            version = sorted(os.listdir("/etc/postgresql"), key=lambda v: [int(x) for x in v.split(".") if x.isdigit()])[-1]
            self.say(f"{service.name}: not answering on {LOOPBACK}:{port}; starting the local cluster {version}/main")
            subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"], check=False)
        self.wait_healthy(service)
        user = service.env.get("POSTGRES_USER", "postgres")
        password = service.env.get("POSTGRES_PASSWORD", "")
        database = service.env.get("POSTGRES_DB", user)

        def psql(sql: str, *, db: str = "postgres", as_user: str = user, file: str | None = None) -> str:
            argv = ["psql", "-X", "-v", "ON_ERROR_STOP=1", "-tAq", "-U", as_user, "-d", db]
            argv += ["-f", file] if file else ["-c", sql]
            done = subprocess.run(argv, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise StackError(f"{service.name}: psql {file or sql!r}: {done.stderr.strip()}")
            return done.stdout.strip()

        tag = service.source.rsplit(":", 1)[1] if ":" in service.source else ""
        wanted = re.match(r"\d+", tag)
        found = int(psql("SHOW server_version_num", as_user=_existing_role(env))) // 10000
        if wanted and int(wanted.group()) != found:
            raise StackError(f"{service.name}: compose.yaml runs {service.source}, this machine's server is "
                             f"PostgreSQL {found}: the native stack would not match compose")
        admin = _existing_role(env)
        if psql(f"SELECT 1 FROM pg_roles WHERE rolname = '{user}'", as_user=admin) != "1":
            psql(f"CREATE ROLE \"{user}\" LOGIN SUPERUSER PASSWORD '{password}'", as_user=admin)
        if psql(f"SELECT 1 FROM pg_database WHERE datname = '{database}'") != "1":
            psql(f"CREATE DATABASE \"{database}\"")
        init = next((native for container, native in service.volumes.items()
                     if container == "/docker-entrypoint-initdb.d"), None)
        for script in sorted(Path(init).glob("*.sql")) if init else []:
            psql("", db=database, file=str(script))

    def _up_minio(self, service: Service) -> None:
        """moto's S3 server on MinIO's S3 port (the first published port), with MinIO's root credentials."""
        argv = [str(venv_bin() / "moto_server"), "-H", LOOPBACK, "-p", str(service.ports[0].published)]
        started = self.ensure_running(service, argv, {**native_env(service), "AWS_ACCESS_KEY_ID": service.env.get(
            "MINIO_ROOT_USER", ""), "AWS_SECRET_ACCESS_KEY": service.env.get("MINIO_ROOT_PASSWORD", "")})
        if started:
            self.wait_healthy(service)
            restored = _copy_volume_into_s3(self._s3(service), Path(service.volumes.get("/data", self.state / "none")))
            if restored:
                self.say(f"{service.name}: restored {restored} objects from its volume {service.volumes['/data']}")

    def _s3(self, service: Service):
        import boto3

        return boto3.client("s3", endpoint_url=f"http://{LOOPBACK}:{service.ports[0].published}", region_name="us-east-1",
                            aws_access_key_id=service.env.get("MINIO_ROOT_USER", "x"),
                            aws_secret_access_key=service.env.get("MINIO_ROOT_PASSWORD", "x"))

    def _up_mc(self, service: Service) -> None:
        """`mc mb --ignore-existing` with boto3: same endpoint, credentials and bucket variables."""
        env = service.env
        missing = [k for k in ("MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_BUCKET")
                   if not env.get(k)]
        if missing:
            raise StackError(f"compose.yaml services.{service.name}.environment: {', '.join(missing)} must be set")
        import boto3

        s3 = boto3.client("s3", endpoint_url=env["MLFLOW_S3_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
        if env["MLFLOW_BUCKET"] not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
            s3.create_bucket(Bucket=env["MLFLOW_BUCKET"])
        self.state.mkdir(parents=True, exist_ok=True)
        self.completed(service, 0)

    # -- stop
    def down(self) -> None:
        """Stop every process group this script started, last started first."""
        for name, service in reversed(list(self.services.items())):
            pid = self.pid(name)
            if pid and service.image == "minio/minio" and "/data" in service.volumes:
                # moto keeps objects in memory; MinIO keeps them in its volume: so does the stand-in.
                saved = _copy_s3_into_volume(self._s3(service), Path(service.volumes["/data"]))
                self.say(f"{name}: saved {saved} objects to its volume {service.volumes['/data']}")
            if pid:
                _stop_group(pid, service.stop_seconds)
                self.say(f"{name}: stopped")
            for suffix in ("pid", "exit", "spec"):
                (self.state / f"{name}.{suffix}").unlink(missing_ok=True)


def _copy_s3_into_volume(s3, folder: Path) -> int:
    """Every bucket's objects as files folder/<bucket>/<key> (the folder is replaced as a whole)."""
    fresh = folder.with_name(folder.name + ".saving")
    shutil.rmtree(fresh, ignore_errors=True)
    fresh.mkdir(parents=True)
    count = 0
    for bucket in (b["Name"] for b in s3.list_buckets().get("Buckets", [])):
        (fresh / bucket).mkdir()
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for item in page.get("Contents", []):
                target = fresh / bucket / item["Key"]
                target.parent.mkdir(parents=True, exist_ok=True)
                s3.download_file(bucket, item["Key"], str(target))
                count += 1
    shutil.rmtree(folder, ignore_errors=True)
    fresh.rename(folder)
    return count


def _copy_volume_into_s3(s3, folder: Path) -> int:
    """Buckets and objects back from folder/<bucket>/<key> into a fresh S3 server."""
    count = 0
    for bucket in sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []:
        s3.create_bucket(Bucket=bucket.name)
        for path in sorted(p for p in bucket.rglob("*") if p.is_file()):
            s3.upload_file(str(path), bucket.name, path.relative_to(bucket).as_posix())
            count += 1
    return count


def _existing_role(env: dict[str, str]) -> str:
    """A role to connect as before POSTGRES_USER exists: PGUSER, else postgres."""
    return env.get("PGUSER") or "postgres"


def group_alive(pgid: int) -> bool:
    """Whether any process of the group is still running (zombies aside)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(") ", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if fields[2] == str(pgid) and fields[0] != "Z":
            return True
    return False


def _stop_group(pid: int, seconds: float = 10.0) -> None:
    """SIGTERM to the process group, SIGKILL to whatever of it is left after `seconds`; returns
    once no process of the group runs (a process signalled is not gone at once, least of all on
    a busy machine)."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and group_alive(pid):
        time.sleep(0.05)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and group_alive(pid):
        time.sleep(0.05)


# --------------------------------------------------------------------------- commands

def client_env(services: dict[str, Service], *, tests: bool) -> dict[str, str]:
    """What a shell on this machine needs to use the stack as the study job does."""
    study = next((s for s in services.values() if "OPTUNA_STORAGE" in s.env and "MLFLOW_TRACKING_URI" in s.env), None)
    server = next((s for s in services.values() if "MLFLOW_S3_ENDPOINT_URL" in s.env and s.kind == "build"), None)
    if study is None or server is None:
        raise StackError("compose.yaml: no service sets OPTUNA_STORAGE and MLFLOW_TRACKING_URI, or none sets MLFLOW_S3_ENDPOINT_URL")
    out = {}
    if tests:  # the suite keeps its own defaults (SQLite); integration tests read these instead
        out["WORKBENCH_TEST_POSTGRES_URL"] = study.env["OPTUNA_STORAGE"]
        out["WORKBENCH_TEST_MLFLOW_URI"] = study.env["MLFLOW_TRACKING_URI"]
    else:
        out["OPTUNA_STORAGE"] = study.env["OPTUNA_STORAGE"]
        out["MLFLOW_TRACKING_URI"] = study.env["MLFLOW_TRACKING_URI"]
    for key in ("MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_BUCKET"):
        if key in server.env:
            out[key] = server.env[key]
    out.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/stack.sh", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.rstrip().split("\n\n")[-1])
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start services (default: all) and their dependencies")
    up.add_argument("services", nargs="*")
    sub.add_parser("down", help="stop what this script started")
    sub.add_parser("status", help="state of each service")
    logs = sub.add_parser("logs", help="a service's output (from .workbench/stack/SERVICE.log)")
    logs.add_argument("service")
    logs.add_argument("-n", "--tail", type=int, default=100, metavar="LINES")
    env = sub.add_parser("env", help="export lines for a shell on this machine")
    env.add_argument("--tests", action="store_true", help="the variables the integration tests read")
    plan = sub.add_parser("plan", help="what `up` runs, per service")
    plan.add_argument("--json", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        variables, source = project_variables()
        state = default_state()
        services = load_services(variables, state=state)
        stack = Stack(services, state)
        if args.command == "up":
            if source == ".env.example":
                print("note: no .env; using .env.example's values (copy it to .env to change them)", file=sys.stderr)
            stack.up(args.services)
        elif args.command == "down":
            stack.down()
        elif args.command == "status":
            for service in services.values():
                print(f"{service.name:<10} {stack.describe(service)}")
        elif args.command == "logs":
            if args.service not in services:
                raise StackError(f"no service named {args.service!r} (services: {', '.join(services)})")
            log = stack.log(args.service)
            lines = log.read_text(errors="replace").splitlines()[-args.tail:] if log.exists() else []
            print("\n".join(lines) if lines else f"({args.service} has no log yet)")
        elif args.command == "env":
            for key, value in client_env(services, tests=args.tests).items():
                print(f"export {key}={shlex.quote(value)}")
        elif args.command == "plan":
            if args.json:
                print(json.dumps({n: asdict(s) for n, s in services.items()}, indent=2))
            else:
                for s in services.values():
                    what = s.stand_in if s.kind == "stand-in" else f"Dockerfile target {s.source}"
                    print(f"{s.name}{' (job)' if s.job else ''}: {what}\n  {shlex.join(s.argv) or '(stand-in)'}")
    except StackError as e:
        print(f"error: {e}", file=sys.stderr)
        return ExitCode.FAILURE
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
