"""Real local services for development and tests, without Docker.

Manages four servers under a local state directory, ``local_dir()``: ``$PLANTSTREAM_LOCAL_DIR`` when set (the
Makefile sets it to the checkout's ``.local/``), else the per-user ``$XDG_STATE_HOME/plantstream`` or
``~/.local/state/plantstream``. Nothing is written next to the code, so an installed wheel works from any
directory.

* ``kafka``     Apache Kafka 4.x, one KRaft node (broker + controller); jars fetched by Maven with the
                ``pom.xml`` shipped in this package (copied into ``<local dir>/kafka/maven/`` and run there).
* ``postgres``  PostgreSQL 15 from Debian's packages, its own cluster in ``<local dir>/postgres/data``.
* ``mosquitto`` Mosquitto MQTT broker from Debian's packages.
* ``influxdb``  InfluxDB 1.x (``influxd``) from Debian's packages.

Every service gets its own directory ``<local dir>/<name>/`` holding its configuration (rewritten on each
start), data, log file and pid file. ``up()`` is idempotent: it installs what is missing, starts only what is
not already healthy, and waits on real protocol-level health checks (a Kafka metadata request, a SQL query,
an MQTT CONNECT, an HTTP ping). ``down()`` stops only processes that ``up()`` started.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import grp
import importlib.resources
import json
import os
import pwd
import secrets
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "SERVICE_NAMES",
    "Ports",
    "ServiceError",
    "ServiceStatus",
    "connection_env",
    "down",
    "install",
    "local_dir",
    "ports_from_env",
    "status",
    "up",
]

SERVICE_NAMES: tuple[str, ...] = ("kafka", "postgres", "mosquitto", "influxdb", "influxdb18")

Progress = Callable[[str], None]

#: The Maven project that fetches the Kafka jars: package data of this package (``localservices/pom.xml``).
POM_PACKAGE = "localservices"
POM_NAME = "pom.xml"

PG_USER = "plantstream"
PG_PASSWORD = "plantstream"
PG_DATABASE = "plantstream"
PG_SUPERUSER = "postgres"
#: The CA certificate the local PostgreSQL's server certificate is signed with, under its service directory
#: (``connection_env()`` gives its path as ``PLANTSTREAM_PG_CA``, for ``sslmode=verify-full``).
PG_CA_FILE = Path("tls") / "ca.crt"
INFLUX_DATABASE = "plantstream"

LOG_TAIL_LINES = 20
#: SCRAM users of the local Kafka's SASL_SSL listener: the pipeline, the issuer of BACnet write commands,
#: and a super user for deploy (topics and ACLs). Their passwords: :func:`kafka_security_env`.
KAFKA_ADMIN_USER = "admin"
KAFKA_SCRAM_USERS = ("plantstream", "commander", KAFKA_ADMIN_USER)


class ServiceError(RuntimeError):
    """A local service could not be installed, started, checked or stopped.

    The message names the service, what failed and the log file to read (with its last lines).
    """


@dataclass
class Ports:
    kafka: int = 9092
    kafka_controller: int = 9093
    kafka_sasl: int = 9094
    postgres: int = 55432
    mosquitto: int = 1883
    influxdb: int = 8086
    influxdb_rpc: int = 8088
    influxdb18: int = 8087
    influxdb18_rpc: int = 8089


@dataclass
class ServiceStatus:
    name: str
    running: bool
    healthy: bool
    pid: int | None
    endpoint: str
    log_file: Path
    detail: str


_PORT_ENV = {
    "kafka": "PLANTSTREAM_KAFKA_PORT",
    "kafka_controller": "PLANTSTREAM_KAFKA_CONTROLLER_PORT",
    "kafka_sasl": "PLANTSTREAM_KAFKA_SASL_PORT",
    "postgres": "PLANTSTREAM_PG_PORT",
    "mosquitto": "PLANTSTREAM_MQTT_PORT",
    "influxdb": "PLANTSTREAM_INFLUX_PORT",
    "influxdb_rpc": "PLANTSTREAM_INFLUX_RPC_PORT",
    "influxdb18": "PLANTSTREAM_INFLUX18_PORT",
    "influxdb18_rpc": "PLANTSTREAM_INFLUX18_RPC_PORT",
}


def ports_from_env() -> Ports:
    """Default ports, overridden by ``PLANTSTREAM_KAFKA_PORT``, ``PLANTSTREAM_PG_PORT``,
    ``PLANTSTREAM_MQTT_PORT``, ``PLANTSTREAM_INFLUX_PORT`` (and, rarely needed,
    ``PLANTSTREAM_KAFKA_CONTROLLER_PORT``, ``PLANTSTREAM_INFLUX_RPC_PORT``)."""
    ports = Ports()
    for attr, var in _PORT_ENV.items():
        raw = os.environ.get(var, "").strip()
        if not raw:
            continue
        try:
            value = int(raw)
        except ValueError:
            raise ServiceError(f"{var}={raw!r} is not a port number") from None
        if not 0 < value < 65536:
            raise ServiceError(f"{var}={value} is outside 1..65535")
        setattr(ports, attr, value)
    return ports


def connection_env(ports: Ports | None = None) -> dict[str, str]:
    """Environment variables through which the pipeline finds the local services."""
    p = ports or ports_from_env()
    return {
        "PLANTSTREAM_KAFKA": f"127.0.0.1:{p.kafka}",
        "PLANTSTREAM_PG_DSN": _pg_dsn(p),
        "PLANTSTREAM_PG_CA": str(local_dir() / "postgres" / PG_CA_FILE),
        "PLANTSTREAM_MQTT_URL": f"mqtt://127.0.0.1:{p.mosquitto}",
        "PLANTSTREAM_INFLUX_URL": f"http://127.0.0.1:{p.influxdb}",
        "PLANTSTREAM_INFLUX_DB": INFLUX_DATABASE,
        "PLANTSTREAM_INFLUX2_URL": f"http://127.0.0.1:{p.influxdb18}",
    }


def kafka_security_env(ports: Ports | None = None, root: Path | None = None) -> dict[str, str]:
    """Environment variables for a topology on the local Kafka's SASL_SSL listener (``broker.security``):
    its address, the CA file and each SCRAM user's password. Available once ``up(['kafka'])`` ran."""
    kafka = _Kafka(root or local_dir(), ports or ports_from_env())
    users = kafka.scram_users()
    return {
        "PLANTSTREAM_KAFKA_SASL": kafka.sasl_endpoint(),
        "PLANTSTREAM_KAFKA_CA": str(kafka.ca_file),
        "PLANTSTREAM_KAFKA_USERNAME": "plantstream",
        "PLANTSTREAM_KAFKA_PASSWORD": users["plantstream"],
        "PLANTSTREAM_KAFKA_COMMANDS_USERNAME": "commander",
        "PLANTSTREAM_KAFKA_COMMANDS_PASSWORD": users["commander"],
        "PLANTSTREAM_KAFKA_ADMIN_USERNAME": KAFKA_ADMIN_USER,
        "PLANTSTREAM_KAFKA_ADMIN_PASSWORD": users[KAFKA_ADMIN_USER],
    }


def local_dir() -> Path:
    """The directory holding the services' configuration, data, logs and pid files.

    ``$PLANTSTREAM_LOCAL_DIR`` when set (``make`` sets it to the checkout's ``.local/``); otherwise a per-user
    directory, ``$XDG_STATE_HOME/plantstream`` (when that is an absolute path, as the XDG specification
    requires) or ``~/.local/state/plantstream``. Never inside the installed package."""
    override = os.environ.get("PLANTSTREAM_LOCAL_DIR", "").strip()
    if override:
        return Path(override).expanduser().resolve()
    state_home = Path(os.environ.get("XDG_STATE_HOME", "").strip()).expanduser()
    if state_home.is_absolute():
        return state_home / "plantstream"
    try:
        home = Path.home()
    except RuntimeError as exc:
        raise ServiceError(
            f"no home directory to keep the local services in ({exc}); set PLANTSTREAM_LOCAL_DIR"
        ) from None
    return home / ".local" / "state" / "plantstream"


def _pom_text() -> str:
    """The Maven project (``pom.xml``) that fetches the Kafka jars, read from the installed package."""
    try:
        return importlib.resources.files(POM_PACKAGE).joinpath(POM_NAME).read_text(encoding="utf-8")
    except (OSError, ModuleNotFoundError) as exc:
        raise ServiceError(
            f"kafka: cannot read {POM_NAME} from the {POM_PACKAGE} package ({exc}); "
            "the installation is incomplete (package data missing from the wheel?)"
        ) from exc


def _pg_dsn(p: Ports) -> str:
    return f"postgresql://{PG_USER}:{PG_PASSWORD}@127.0.0.1:{p.postgres}/{PG_DATABASE}"


# ----------------------------------------------------------------------------------------------------------
# Process and file helpers
# ----------------------------------------------------------------------------------------------------------


def _quiet(_message: str) -> None:
    return None


def _is_root() -> bool:
    return os.geteuid() == 0


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            data = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


def _log_excerpt(*paths: Path) -> str:
    parts = []
    for path in paths:
        text = _tail(path)
        if text.strip():
            parts.append(f"--- last {LOG_TAIL_LINES} lines of {path} ---\n{text}")
    return ("\n" + "\n".join(parts)) if parts else ""


def _pid_alive(pid: int) -> bool:
    """True when ``pid`` is a live process (zombies count as dead; our own zombie children are reaped)."""
    if pid <= 0:
        return False
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    state = raw.rsplit(")", 1)[-1].split()[0] if ")" in raw else "?"
    if state in ("Z", "X"):
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
        return False
    return True


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode("utf-8", errors="replace") for part in raw.split(b"\0") if part]


def _describe(pid: int) -> str:
    cmd = shlex.join(_cmdline(pid))
    if len(cmd) > 160:
        cmd = cmd[:157] + "..."
    return f"pid {pid} ({cmd or 'command unknown'})"


def _read_pid(path: Path) -> int | None:
    try:
        first = path.read_text().split("\n", 1)[0].strip()
        return int(first)
    except (OSError, ValueError):
        return None


def _write_text(path: Path, text: str, mode: int = 0o644) -> None:
    """Write atomically (so a running process never reads a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _listening_inodes(port: int) -> set[str] | None:
    """Socket inodes of TCP listeners on ``port`` (any address), from /proc/net; None without /proc."""
    inodes: set[str] = set()
    found_table = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        found_table = True
        for row in rows:
            fields = row.split()
            if len(fields) < 10 or fields[3] != "0A":  # 0A = LISTEN
                continue
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes if found_table else None


def _port_open(port: int, timeout: float = 0.5) -> bool:
    """Whether something listens on ``port``. Read from /proc/net rather than by connecting, so that the
    servers do not log a stray connection for every probe."""
    inodes = _listening_inodes(port)
    if inodes is not None:
        return bool(inodes)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def _listener_pids(port: int) -> set[int]:
    """Pids of processes holding a listening TCP socket on ``port`` (needs permission to read their fds)."""
    inodes = _listening_inodes(port)
    if not inodes:
        return set()
    targets = {f"socket:[{inode}]" for inode in inodes}
    pids: set[int] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in targets:
                        pids.add(int(proc.name))
                        break
        except OSError:
            continue
    return pids


def _as_user(user: str, cmd: Sequence[str]) -> list[str]:
    """Run ``cmd`` as ``user`` when we are root (PostgreSQL refuses to run as root), else as ourselves."""
    if not _is_root():
        return list(cmd)
    runuser = shutil.which("runuser")
    if runuser:
        return [runuser, "-u", user, "--", *cmd]
    return ["su", user, "-s", "/bin/sh", "-c", shlex.join(cmd)]


def _show(cmd: Sequence[str]) -> str:
    """A command for messages, with very long arguments (class paths) shortened."""
    return shlex.join(arg if len(arg) <= 120 else f"{arg[:60]}...({len(arg)} chars)" for arg in cmd)


def _vendor_dir() -> Path:
    """Upstream source archives for servers without a package here: PLANTSTREAM_VENDOR_DIR, else
    ../shared/vendor beside the checkout the command runs in."""
    override = os.environ.get("PLANTSTREAM_VENDOR_DIR")
    return Path(override).expanduser() if override else Path.cwd().parent / "shared" / "vendor"


def _vendor_archive(pattern: str) -> Path | None:
    found = sorted(_vendor_dir().glob(pattern)) if _vendor_dir().is_dir() else []
    return found[-1] if found else None


def _deb_installed(package: str) -> bool:
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "install ok installed" in out.stdout


def _run(
    service: str,
    what: str,
    cmd: Sequence[str],
    *,
    log_file: Path,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 300,
) -> str:
    """Run a command to completion, appending its output to ``log_file``; ServiceError on failure."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(
            list(cmd),
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as exc:
        raise ServiceError(f"{service}: {what} failed: {exc}") from exc
    except subprocess.TimeoutExpired as exc:
        raise ServiceError(f"{service}: {what} did not finish within {timeout:.0f}s: {_show(cmd)}") from exc
    output = (proc.stdout or "") + (proc.stderr or "")
    with log_file.open("a") as fh:
        fh.write(f"$ {_show(cmd)}\n{output}")
        if output and not output.endswith("\n"):
            fh.write("\n")
    if proc.returncode != 0:
        raise ServiceError(
            f"{service}: {what} failed (exit {proc.returncode}): {_show(cmd)}. "
            f"Log: {log_file}{_log_excerpt(log_file)}"
        )
    return proc.stdout or ""


def _make_certificates(service: str, d: Path, ca_file: Path, ca_name: str, names: str, log: Path) -> None:
    """With openssl, in ``d``: a local CA (``ca_file``, its key ``ca.key``) named ``ca_name``, and a server
    key and certificate signed by it (``server.key``, ``server.crt``) for ``names`` (subjectAltName)."""
    if shutil.which("openssl") is None:
        raise ServiceError(
            f"{service}: no 'openssl' on PATH to make the TLS certificates; apt-get install openssl"
        )
    ca_key, key, csr, crt, ext = (
        d / "ca.key",
        d / "server.key",
        d / "server.csr",
        d / "server.crt",
        d / "san.ext",
    )
    _write_text(ext, f"subjectAltName={names}\nextendedKeyUsage=serverAuth\n")
    new_ca = ["-out", str(ca_file), "-days", "3650", "-subj", f"/CN={ca_name}"]
    sign = ["-CA", str(ca_file), "-CAkey", str(ca_key), "-CAcreateserial", "-out", str(crt), "-days", "3650"]
    steps = [
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), *new_ca],
        ["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", str(key)],
        ["openssl", "req", "-new", "-key", str(key), "-out", str(csr), "-subj", "/CN=localhost"],
        ["openssl", "x509", "-req", "-in", str(csr), *sign, "-extfile", str(ext)],
    ]
    for cmd in steps:
        _run(service, "making the TLS certificates (openssl)", cmd, cwd=d, log_file=log, timeout=120)


def _spawn(cmd: Sequence[str], *, cwd: Path, out_file: Path, env: dict[str, str] | None = None) -> int:
    """Start ``cmd`` fully detached (own session, re-parented away from us, stdin from /dev/null, stdout and
    stderr appended to ``out_file``) and return its pid."""
    out_file.parent.mkdir(parents=True, exist_ok=True)
    script = 'out="$1"; shift; "$@" </dev/null >>"$out" 2>&1 & echo $!'
    proc = subprocess.run(
        ["/bin/sh", "-c", script, "sh", str(out_file), *cmd],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        start_new_session=True,
        check=True,
    )
    return int(proc.stdout.strip())


def _signal_and_wait(pid: int, timeout: float, progress: Progress | None = None) -> bool:
    """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL. True if the process is gone."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if _wait_exit(pid, timeout):
        return True
    if progress is not None:
        progress(f"pid {pid} did not exit within {timeout:.0f}s of SIGTERM; sending SIGKILL")
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    return _wait_exit(pid, 10)


def _wait_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _user_ids(user: str) -> tuple[int, int, set[int]] | None:
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        return None
    groups = {g.gr_gid for g in grp.getgrall() if user in g.gr_mem} | {pw.pw_gid}
    return pw.pw_uid, pw.pw_gid, groups


def _ensure_traversable(path: Path, user: str, progress: Progress) -> None:
    """Make sure ``user`` can reach ``path``: add o+x to any ancestor it could not traverse (root only)."""
    ids = _user_ids(user)
    if ids is None or not _is_root():
        return
    uid, _gid, groups = ids
    for directory in reversed(path.parents):
        st = directory.stat()
        if st.st_uid == uid:
            ok = st.st_mode & stat.S_IXUSR
        elif st.st_gid in groups:
            ok = st.st_mode & stat.S_IXGRP
        else:
            ok = st.st_mode & stat.S_IXOTH
        if not ok:
            os.chmod(directory, stat.S_IMODE(st.st_mode) | stat.S_IXOTH)
            progress(f"chmod o+x {directory} so that user '{user}' can reach {path}")


def _chown(path: Path, user: str, *, recursive: bool = False) -> None:
    ids = _user_ids(user)
    if ids is None or not _is_root():
        return
    uid, gid, _groups = ids
    paths: Iterable[Path] = [path]
    if recursive and path.is_dir():
        paths = [path, *path.rglob("*")]
    for item in paths:
        with contextlib.suppress(FileNotFoundError):
            st = item.lstat()
            if st.st_uid != uid or st.st_gid != gid:
                os.lchown(item, uid, gid)


@contextlib.contextmanager
def _lock() -> Iterator[None]:
    """Serialise up()/down() across processes (two test sessions starting the same services)."""
    root = local_dir()
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".services.lock").open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _http(url: str, *, data: dict[str, str] | None = None, timeout: float = 3.0) -> tuple[int, bytes]:
    """Plain HTTP to a loopback address, ignoring any proxy settings of the environment."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    body = urllib.parse.urlencode(data).encode() if data is not None else None
    request = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
    try:
        with opener.open(request, timeout=timeout) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


# ----------------------------------------------------------------------------------------------------------
# Services
# ----------------------------------------------------------------------------------------------------------


class _Service:
    """One managed server. Subclasses fill in configuration, launch, health and provisioning."""

    name = ""
    #: Debian executables whose absence means the package must be installed: {path: package}.
    binaries: dict[str, str] = {}
    #: Name of a Debian init service that may hold our port (only ever stopped, never disabled).
    system_service: str | None = None
    #: Seconds to wait for a clean exit after SIGTERM before SIGKILL.
    stop_timeout: float = 20.0
    #: Seconds after launch during which a missing pid is not yet taken as a failed start (pg_ctl -W
    #: returns before the postmaster has written its pid file).
    launch_grace: float = 0.0

    def __init__(self, root: Path, ports: Ports) -> None:
        self.root = root
        self.ports = ports
        self.dir = root / self.name
        self.pid_file = self.dir / f"{self.name}.pid"
        self.log_file = self.dir / f"{self.name}.log"
        #: Where the process's own stdout/stderr go, when that differs from ``log_file``.
        self.out_file = self.dir / f"{self.name}.out"
        self.launched_at = 0.0

    # --- description --------------------------------------------------------------------------------------
    def endpoint(self) -> str:
        raise NotImplementedError

    def connection(self) -> str:
        raise NotImplementedError

    def listen_ports(self) -> list[int]:
        raise NotImplementedError

    def marker(self) -> str:
        """A string found in the command line of our own process (its configuration path)."""
        raise NotImplementedError

    def config_files(self) -> dict[Path, str]:
        """The configuration files this service is started with, and their wanted contents."""
        raise NotImplementedError

    def write_configs(self, mode: int = 0o644) -> None:
        for path, text in self.config_files().items():
            _write_text(path, text, mode=mode)

    def config_drift(self) -> list[Path]:
        """Configuration files whose contents differ from what a start now would write (ports changed
        through the environment since the running process was started, say)."""
        drifted = []
        for path, text in self.config_files().items():
            try:
                current = path.read_text()
            except OSError:
                current = None
            if current != text:
                drifted.append(path)
        return drifted

    # --- installation -------------------------------------------------------------------------------------
    def missing_packages(self) -> list[str]:
        return [pkg for binary, pkg in self.binaries.items() if not Path(binary).exists()]

    def install_extra(self, progress: Progress) -> None:
        return None

    def unavailable(self) -> str | None:
        """Why this service cannot run on this machine (then ``up`` skips it), or None."""
        return None

    # --- health -------------------------------------------------------------------------------------------
    def check(self, timeout: float = 3.0) -> str | None:
        """None when the service answers a real request and is provisioned; otherwise the reason."""
        raise NotImplementedError

    def ready(self, timeout: float = 3.0) -> str | None:
        """None once the server answers well enough to be provisioned (defaults to ``check``)."""
        return self.check(timeout)

    def provision(self, progress: Progress) -> None:
        return None

    # --- processes ----------------------------------------------------------------------------------------
    def _ours(self, pid: int) -> bool:
        return _pid_alive(pid) and self.marker() in _cmdline(pid)

    def find_pid(self) -> int | None:
        """Pid of the process we started: from the pid file, else found listening on our port with our config
        on its command line (pid file lost), in which case the pid file is rewritten."""
        pid = _read_pid(self.pid_file)
        if pid is not None and self._ours(pid):
            return pid
        for port in self.listen_ports()[:1]:
            for candidate in sorted(_listener_pids(port)):
                if self._ours(candidate):
                    with contextlib.suppress(OSError):
                        _write_text(self.pid_file, f"{candidate}\n")
                    return candidate
        return None

    def stale_pid(self) -> int | None:
        pid = _read_pid(self.pid_file)
        if pid is not None and not self._ours(pid):
            return pid
        return None

    def clean_stale_pid(self, progress: Progress) -> None:
        pid = self.stale_pid()
        if pid is not None:
            progress(f"{self.name}: removing stale pid file {self.pid_file} (pid {pid} is not running)")
            with contextlib.suppress(FileNotFoundError):
                self.pid_file.unlink()

    def is_system_instance(self, pid: int) -> bool:
        return False

    def ensure_ports_free(self, progress: Progress) -> None:
        """Before starting: our ports must be free. A Debian system instance of the same server holding them
        is stopped; anything else is reported."""
        for port in self.listen_ports():
            if not _port_open(port):
                continue
            pids = _listener_pids(port)
            for pid in sorted(pids):
                if self.is_system_instance(pid):
                    self.stop_system_instance(pid, port, progress)
            if _port_open(port):
                holders = (
                    ", ".join(_describe(p) for p in sorted(_listener_pids(port))) or "an unknown process"
                )
                raise ServiceError(
                    f"{self.name}: port 127.0.0.1:{port} is already in use by {holders}, which was not "
                    "started by plantstream. Stop it or choose another port (see ports_from_env()). "
                    f"Log: {self.log_file}"
                )

    def stop_system_instance(self, pid: int, port: int, progress: Progress) -> None:
        progress(
            f"{self.name}: a system instance holds port {port}: {_describe(pid)}; stopping it "
            f"(it is not disabled and may come back at boot)"
        )
        if self.system_service and shutil.which("service") and _is_root():
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(
                    ["service", self.system_service, "stop"],
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    timeout=30,
                    check=False,
                )
        if _pid_alive(pid):
            try:
                _signal_and_wait(pid, 15)
            except PermissionError as exc:
                raise ServiceError(
                    f"{self.name}: cannot stop the system instance {_describe(pid)} holding port {port}: "
                    f"{exc}. Run as root or stop it yourself (service {self.system_service} stop)."
                ) from exc
        deadline = time.monotonic() + 10
        while _port_open(port) and time.monotonic() < deadline:
            time.sleep(0.2)

    def start(self, progress: Progress) -> None:
        """Write configuration, initialise storage if needed and launch the server (without waiting)."""
        raise NotImplementedError

    def stop(self, progress: Progress) -> None:
        pid = self.find_pid()
        if pid is None:
            self.clean_stale_pid(_quiet)
            progress(f"{self.name}: not running")
            return
        progress(f"{self.name}: stopping pid {pid}")
        if not _signal_and_wait(pid, self.stop_timeout, progress):
            raise ServiceError(f"{self.name}: pid {pid} did not exit after SIGKILL. Log: {self.log_file}")
        with contextlib.suppress(FileNotFoundError):
            self.pid_file.unlink()
        progress(f"{self.name}: stopped")

    def error(self, what: str) -> ServiceError:
        logs = [self.log_file] + ([self.out_file] if self.out_file != self.log_file else [])
        return ServiceError(f"{self.name}: {what}. Log: {self.log_file}{_log_excerpt(*logs)}")

    def wait_healthy(self, deadline: float, timeout: float, progress: Progress) -> None:
        last: str | None = "not checked yet"
        while True:
            remaining = deadline - time.monotonic()
            last = self.ready(timeout=max(0.5, min(3.0, remaining)))
            if last is None:
                break
            if self.find_pid() is None and time.monotonic() - self.launched_at > self.launch_grace:
                raise self.error(f"the process exited during startup (last check: {last})")
            if remaining <= 0:
                raise self.error(f"not healthy within {timeout:.0f}s (last check: {last})")
            time.sleep(0.3)
        self.provision(progress)
        problem = self.check()
        if problem is not None:
            raise self.error(f"started but the health check still fails: {problem}")


class _Kafka(_Service):
    name = "kafka"
    stop_timeout = 60.0

    def __init__(self, root: Path, ports: Ports) -> None:
        super().__init__(root, ports)
        self.libs = self.dir / "libs"
        self.data = self.dir / "data"
        self.config = self.dir / "server.properties"
        self.log4j = self.dir / "log4j2.properties"
        self.cluster_id_file = self.dir / "cluster-id"
        self.maven_dir = self.dir / "maven"
        self.tls_dir = self.dir / "tls"
        self.ca_file = self.tls_dir / "ca.pem"
        self.keystore = (
            self.tls_dir / "server-keystore.pem"
        )  # key (PKCS#8) and certificate, ssl.keystore.type=PEM
        self.users_file = self.tls_dir / "scram-users.json"

    def endpoint(self) -> str:
        return f"127.0.0.1:{self.ports.kafka}"

    def connection(self) -> str:
        return self.endpoint()

    def listen_ports(self) -> list[int]:
        return [self.ports.kafka, self.ports.kafka_controller, self.ports.kafka_sasl]

    def marker(self) -> str:
        return str(self.config)

    def sasl_endpoint(self) -> str:
        return f"127.0.0.1:{self.ports.kafka_sasl}"

    def scram_users(self) -> dict[str, str]:
        """{user: password} of the SASL_SSL listener, made up once per local directory (file mode 0600)."""
        try:
            users: dict[str, str] = json.loads(self.users_file.read_text())
            if set(users) == set(KAFKA_SCRAM_USERS):
                return users
        except (OSError, ValueError):
            pass
        users = {name: secrets.token_urlsafe(18) for name in KAFKA_SCRAM_USERS}
        _write_text(self.users_file, json.dumps(users, indent=1) + "\n", mode=0o600)
        return users

    def ensure_tls(self, progress: Progress) -> None:
        """A local CA and a server certificate for 127.0.0.1 and localhost, made once with openssl."""
        if self.ca_file.exists() and self.keystore.exists():
            return
        progress(f"kafka: making a local CA and a server certificate in {self.tls_dir}")
        self.tls_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.tls_dir, 0o700)
        d = self.tls_dir
        names = "IP:127.0.0.1,DNS:localhost"
        _make_certificates("kafka", d, self.ca_file, "plantstream local CA", names, self.dir / "tls.log")
        key, crt = d / "server.key", d / "server.crt"
        _write_text(self.keystore, key.read_text() + crt.read_text(), mode=0o600)

    def config_files(self) -> dict[Path, str]:
        return {self.config: self._server_properties(), self.log4j: self._log4j_properties()}

    def _java(self) -> str | None:
        return shutil.which("java")

    def _jars(self, pattern: str) -> list[str]:
        return sorted(glob.glob(str(self.libs / pattern)))

    def missing_packages(self) -> list[str]:
        missing = []
        if self._java() is None:
            missing.append("openjdk-17-jre-headless")
        if not self._jars("kafka_2.13-*.jar") and shutil.which("mvn") is None:
            missing.append("maven")
        return missing

    def _maven_project(self) -> Path:
        """A writable directory holding a copy of the package's pom.xml, where Maven runs (never inside the
        installed package, which may be read-only site-packages)."""
        _write_text(self.maven_dir / POM_NAME, _pom_text())
        return self.maven_dir

    def install_extra(self, progress: Progress) -> None:
        install_log = self.dir / "install.log"
        need_kafka = not self._jars("kafka_2.13-*.jar")
        need_binding = bool(self._jars("slf4j-api-1.*.jar")) and not self._jars("log4j-slf4j-impl-*.jar")
        if not (need_kafka or need_binding):
            return
        maven_dir = self._maven_project()
        if need_kafka:
            progress(f"kafka: fetching the broker jars with Maven into {self.libs} (log: {install_log})")
            self.libs.mkdir(parents=True, exist_ok=True)
            _run(
                "kafka",
                "fetching the Kafka jars (mvn dependency:copy-dependencies)",
                ["mvn", "-q", "-B", "dependency:copy-dependencies", f"-DoutputDirectory={self.libs}"],
                cwd=maven_dir,
                log_file=install_log,
                timeout=1800,
            )
            if not self._jars("kafka_2.13-*.jar"):
                raise ServiceError(
                    f"kafka: Maven ran but no kafka_2.13 jar is in {self.libs}. Log: {install_log}"
                )
        # Kafka 4.x still uses the SLF4J 1.7 API; the log4j binding for SLF4J 2 (log4j-slf4j2-impl) is
        # silently ignored by it and the broker would log nothing. Add the SLF4J 1.x binding of the same
        # log4j version.
        if self._jars("slf4j-api-1.*.jar") and not self._jars("log4j-slf4j-impl-*.jar"):
            cores = self._jars("log4j-core-*.jar")
            version = (
                Path(cores[-1]).name.removeprefix("log4j-core-").removesuffix(".jar") if cores else "2.24.3"
            )
            progress(f"kafka: fetching log4j-slf4j-impl {version} (SLF4J 1.x binding, so the broker logs)")
            _run(
                "kafka",
                "fetching log4j-slf4j-impl (mvn dependency:copy)",
                [
                    "mvn",
                    "-q",
                    "-B",
                    "dependency:copy",
                    f"-Dartifact=org.apache.logging.log4j:log4j-slf4j-impl:{version}",
                    f"-DoutputDirectory={self.libs}",
                ],
                cwd=maven_dir,
                log_file=install_log,
                timeout=600,
            )

    def check(self, timeout: float = 3.0) -> str | None:
        if not _port_open(self.ports.kafka):
            return f"nothing listening on 127.0.0.1:{self.ports.kafka}"
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient

        client = AdminClient(
            {
                "bootstrap.servers": self.endpoint(),
                "socket.timeout.ms": max(1000, int(timeout * 1000)),
                "log_level": 0,  # connection errors are reported through the return value, not stderr
            }
        )
        try:
            metadata = client.list_topics(timeout=timeout)
        except KafkaException as exc:
            return f"metadata request failed: {exc}"
        if not metadata.brokers:
            return "metadata response lists no brokers yet"
        return None

    def provision(self, progress: Progress) -> None:
        """Create (or reset) the SCRAM users through the PLAINTEXT listener; idempotent, on every start, so
        storage formatted before the SASL_SSL listener existed gets them too."""
        from confluent_kafka.admin import (
            AdminClient,
            ScramCredentialInfo,
            ScramMechanism,
            UserScramCredentialUpsertion,
        )

        client = AdminClient({"bootstrap.servers": self.endpoint(), "log_level": 0})
        # One request per mechanism: a request may change each user's credentials only once.
        for mech in (ScramMechanism.SCRAM_SHA_256, ScramMechanism.SCRAM_SHA_512):
            upserts = [
                UserScramCredentialUpsertion(user, ScramCredentialInfo(mech, 8192), password.encode())
                for user, password in self.scram_users().items()
            ]
            for user, fut in client.alter_user_scram_credentials(upserts).items():
                try:
                    fut.result(30)
                except Exception as exc:  # any failure is a failed start, reported with the log
                    raise self.error(f"creating the SCRAM user {user} failed: {exc}") from exc
        progress(f"kafka: SASL_SSL on {self.sasl_endpoint()} with users {', '.join(KAFKA_SCRAM_USERS)}")

    def _server_properties(self) -> str:
        p, sasl = self.ports, "listener.name.sasl_ssl"
        # A static single-voter quorum (controller.quorum.voters) rather than a dynamic one formatted with
        # --standalone: the dynamic form records the controller endpoint in the metadata log, so a later
        # change of PLANTSTREAM_KAFKA_CONTROLLER_PORT would leave the node unable to find its own quorum.
        return f"""# Written by localservices/harness.py on every start; edits are overwritten.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{p.kafka_controller}
listeners=PLAINTEXT://127.0.0.1:{p.kafka},CONTROLLER://127.0.0.1:{p.kafka_controller},SASL_SSL://127.0.0.1:{p.kafka_sasl}
advertised.listeners=PLAINTEXT://127.0.0.1:{p.kafka},SASL_SSL://127.0.0.1:{p.kafka_sasl}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL
# SASL_SSL: SCRAM users (created at start) over TLS with a local CA. The PLAINTEXT listener's principal
# (User:ANONYMOUS) stays a super user so development and tests on it are unaffected; a production broker has
# no such listener.
sasl.enabled.mechanisms=SCRAM-SHA-256,SCRAM-SHA-512
{sasl}.sasl.enabled.mechanisms=SCRAM-SHA-256,SCRAM-SHA-512
{sasl}.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
{sasl}.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
{sasl}.ssl.keystore.type=PEM
{sasl}.ssl.keystore.location={self.keystore}
{sasl}.ssl.client.auth=none
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
super.users=User:ANONYMOUS;User:{KAFKA_ADMIN_USER}
allow.everyone.if.no.acl.found=false
log.dirs={self.data}
num.partitions=4
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=true
delete.topic.enable=true
log.retention.hours=168
num.network.threads=3
num.io.threads=4
"""

    def _log4j_properties(self) -> str:
        log = self.log_file
        return f"""# Written by localservices/harness.py on every start; edits are overwritten.
status = warn
name = plantstream-kafka
appender.file.type = RollingFile
appender.file.name = FILE
appender.file.fileName = {log}
appender.file.filePattern = {log}.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 50MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 3
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.request.additivity = false
logger.request.appenderRef.file.ref = FILE
logger.state.name = state.change.logger
logger.state.level = WARN
logger.cleaner.name = kafka.log.LogCleaner
logger.cleaner.level = WARN
logger.authorizer.name = kafka.authorizer.logger
logger.authorizer.level = WARN
logger.clients.name = org.apache.kafka.clients
logger.clients.level = WARN
"""

    def _classpath(self) -> str:
        jars = self._jars("*.jar")
        if self._jars("slf4j-api-1.*.jar") and self._jars("log4j-slf4j-impl-*.jar"):
            # Both log4j bindings define org.apache.logging.slf4j.Log4jLoggerFactory; the SLF4J 2 one fails
            # against slf4j-api 1.7 (NoClassDefFoundError), so leave it off the class path.
            jars = [jar for jar in jars if not Path(jar).name.startswith("log4j-slf4j2-impl-")]
        return os.pathsep.join(jars)

    def start(self, progress: Progress) -> None:
        java = self._java()
        if java is None:
            raise ServiceError("kafka: no 'java' on PATH (Java 17 is needed); run install(['kafka'])")
        if not self._jars("kafka_2.13-*.jar"):
            raise ServiceError(f"kafka: no kafka_2.13 jar in {self.libs}; run install(['kafka'])")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ensure_tls(progress)
        self.write_configs()
        base = [java, "-Xmx512m", f"-Dlog4j2.configurationFile={self.log4j}", "-cp", self._classpath()]
        if not (self.data / "meta.properties").exists():
            if not self.cluster_id_file.exists():
                out = _run(
                    "kafka",
                    "generating a cluster id (StorageTool random-uuid)",
                    [*base, "kafka.tools.StorageTool", "random-uuid"],
                    cwd=self.dir,
                    log_file=self.out_file,
                    timeout=120,
                )
                cluster_id = out.strip().splitlines()[-1].strip() if out.strip() else ""
                if not cluster_id:
                    raise self.error("StorageTool random-uuid printed no cluster id")
                _write_text(self.cluster_id_file, cluster_id + "\n")
            cluster_id = self.cluster_id_file.read_text().strip()
            progress(f"kafka: formatting KRaft storage in {self.data} (cluster id {cluster_id})")
            _run(
                "kafka",
                "formatting the KRaft storage (StorageTool format)",
                [
                    *base,
                    "kafka.tools.StorageTool",
                    "format",
                    "-t",
                    cluster_id,
                    "-c",
                    str(self.config),
                    "--ignore-formatted",
                ],
                cwd=self.dir,
                log_file=self.out_file,
                timeout=180,
            )
        self.ensure_ports_free(progress)
        cmd = [
            java,
            "-Xms256m",
            "-Xmx1g",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-XX:+ExitOnOutOfMemoryError",
            "-Djava.awt.headless=true",
            f"-Dkafka.logs.dir={self.dir}",
            f"-Dlog4j2.configurationFile={self.log4j}",
            "-cp",
            self._classpath(),
            "kafka.Kafka",
            str(self.config),
        ]
        pid = _spawn(cmd, cwd=self.dir, out_file=self.out_file)
        _write_text(self.pid_file, f"{pid}\n")
        progress(f"kafka: started pid {pid} on {self.endpoint()} (log: {self.log_file})")


class _Postgres(_Service):
    name = "postgres"
    system_service = None  # Debian's own cluster listens on 5432 and is left alone
    launch_grace = 15.0

    def __init__(self, root: Path, ports: Ports) -> None:
        super().__init__(root, ports)
        self.bin = Path(os.environ.get("PLANTSTREAM_PG_BIN", "/usr/lib/postgresql/15/bin"))
        self.binaries = {
            str(self.bin / "postgres"): "postgresql-15",
            str(self.bin / "pg_ctl"): "postgresql-15",
        }
        self.data = self.dir / "data"
        self.out_file = self.log_file
        self.admin_log = self.dir / "admin.log"
        self.tls_dir = self.dir / "tls"
        self.ca_file = self.dir / PG_CA_FILE
        self.hba_file = self.data / "plantstream_hba.conf"
        sock = self.dir / "sock"
        # A Unix socket path is limited to 107 bytes; fall back to /tmp for deep checkouts.
        self.sock = sock if len(f"{sock}/.s.PGSQL.{ports.postgres}") < 100 else Path("/tmp")

    def endpoint(self) -> str:
        return f"127.0.0.1:{self.ports.postgres}"

    def connection(self) -> str:
        return _pg_dsn(self.ports)

    def listen_ports(self) -> list[int]:
        return [self.ports.postgres]

    def marker(self) -> str:
        return str(self.data)

    def config_files(self) -> dict[Path, str]:
        return {self.data / "plantstream.conf": self._settings(), self.hba_file: self._hba()}

    def _hba(self) -> str:
        # Unix socket: the harness's own superuser connections (the socket directory is the OS user's only).
        # TCP: password (SCRAM) over TLS; plain TCP stays allowed so that DSNs without sslmode (libpq's
        # default is prefer, which takes TLS when offered) and sslmode=disable keep working.
        return """# Written by localservices/harness.py on every start; edits are overwritten.
local    all          all                    trust
hostssl  all          all  127.0.0.1/32      scram-sha-256
hostssl  all          all  ::1/128           scram-sha-256
host     all          all  127.0.0.1/32      scram-sha-256
host     all          all  ::1/128           scram-sha-256
local    replication  all                    trust
"""

    def ensure_tls(self, user: str, progress: Progress) -> None:
        """A local CA and a server certificate for 127.0.0.1 and localhost, made once with openssl; the
        key readable by the server's OS user only, as PostgreSQL requires."""
        d, crt, key = self.tls_dir, self.tls_dir / "server.crt", self.tls_dir / "server.key"
        if not (self.ca_file.exists() and crt.exists() and key.exists()):
            progress(f"postgres: making a local CA and a server certificate in {d}")
            d.mkdir(parents=True, exist_ok=True)
            names = "IP:127.0.0.1,IP:::1,DNS:localhost"
            ca_name = "plantstream local PostgreSQL CA"
            _make_certificates("postgres", d, self.ca_file, ca_name, names, self.dir / "tls.log")
        os.chmod(d, 0o755)  # clients read ca.crt; the keys are 0600
        for path, mode in ((key, 0o600), (d / "ca.key", 0o600), (crt, 0o644), (self.ca_file, 0o644)):
            if path.exists():
                os.chmod(path, mode)
        _chown(key, user)
        _chown(crt, user)

    # -- TimescaleDB: an installed one, else built from the vendored source archive, preloaded ----------
    def timescale_library(self) -> Path:
        libdir = Path(os.environ.get("PLANTSTREAM_PG_LIBDIR", str(self.bin.parent / "lib")))
        return libdir / "timescaledb.so"

    def install_extra(self, progress: Progress) -> None:
        if self.timescale_library().exists():
            return
        archive = _vendor_archive("timescaledb-*.tar.gz")
        if archive is None:
            progress(
                "postgres: TimescaleDB is not installed and no source archive was found "
                f"({_vendor_dir()}/timescaledb-*.tar.gz, or set PLANTSTREAM_VENDOR_DIR): plain PostgreSQL"
            )
            return
        if not _is_root():
            progress("postgres: building TimescaleDB needs root (apt-get, make install); plain PostgreSQL")
            return
        build = self.root / "build" / archive.name.removesuffix(".tar.gz")
        log = self.root / "build" / "timescaledb.log"
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        progress(f"postgres: building TimescaleDB from {archive.name} (about 2 minutes; log: {log})")
        need = [p for p in ("cmake", "postgresql-server-dev-15", "libssl-dev") if not _deb_installed(p)]
        if need:
            _run("postgres", "apt-get update", ["apt-get", "update"], log_file=log, env=env, timeout=900)
            _run(
                "postgres",
                "apt-get install",
                ["apt-get", "install", "-y", "--no-install-recommends", *need],
                log_file=log,
                env=env,
                timeout=1800,
            )
        shutil.rmtree(build, ignore_errors=True)
        build.mkdir(parents=True)
        _run(
            "postgres",
            "unpack",
            ["tar", "-xzf", str(archive), "-C", str(build), "--strip-components=1"],
            log_file=log,
        )
        flags = ["-DREGRESS_CHECKS=OFF", "-DTAP_CHECKS=OFF", "-DWARNINGS_AS_ERRORS=OFF", "-DLINTER=OFF"]
        _run(
            "postgres",
            "bootstrap",
            ["./bootstrap", *flags, "-DCMAKE_BUILD_TYPE=Release", f"-DPG_CONFIG={self.bin / 'pg_config'}"]
            if (self.bin / "pg_config").exists()
            else ["./bootstrap", *flags, "-DCMAKE_BUILD_TYPE=Release"],
            cwd=build,
            log_file=log,
            timeout=600,
        )
        _run("postgres", "make", ["make", "-j2"], cwd=build / "build", log_file=log, timeout=1800)
        _run("postgres", "make install", ["make", "install"], cwd=build / "build", log_file=log, timeout=600)
        if not self.timescale_library().exists():
            raise self.error(f"TimescaleDB built but {self.timescale_library()} is missing; see {log}")
        progress(f"postgres: TimescaleDB installed ({self.timescale_library()})")

    def _os_user(self) -> str:
        return PG_SUPERUSER if _is_root() else pwd.getpwuid(os.geteuid()).pw_name

    def find_pid(self) -> int | None:
        # The postmaster records itself in data/postmaster.pid; that is our pid file.
        pid = _read_pid(self.data / "postmaster.pid")
        if pid is not None and self._ours(pid):
            return pid
        return None

    def stale_pid(self) -> int | None:
        pid = _read_pid(self.data / "postmaster.pid")
        if pid is not None and not self._ours(pid):
            return pid
        return None

    def clean_stale_pid(self, progress: Progress) -> None:
        # postgres itself replaces a postmaster.pid whose process is gone; nothing to remove by hand.
        return None

    def _superuser_conninfo(self) -> str:
        from psycopg.conninfo import make_conninfo

        return make_conninfo(
            host=str(self.sock), port=self.ports.postgres, user=PG_SUPERUSER, dbname="postgres"
        )

    def ready(self, timeout: float = 3.0) -> str | None:
        import psycopg

        try:
            with psycopg.connect(self._superuser_conninfo(), connect_timeout=max(1, int(timeout))) as conn:
                conn.execute("SELECT 1")
        except psycopg.Error as exc:
            return f"superuser connection over {self.sock} failed: {str(exc).strip()}"
        return None

    def check(self, timeout: float = 3.0) -> str | None:
        import psycopg

        if not _port_open(self.ports.postgres):
            return f"nothing listening on {self.endpoint()}"
        try:
            with psycopg.connect(self.connection(), connect_timeout=max(1, int(timeout))) as conn:
                row = conn.execute("SELECT 1").fetchone()
        except psycopg.Error as exc:
            return f"SELECT 1 as {PG_USER} failed: {str(exc).strip()}"
        if row is None or row[0] != 1:
            return f"SELECT 1 returned {row!r}"
        return None

    def provision(self, progress: Progress) -> None:
        import psycopg
        from psycopg.conninfo import make_conninfo

        with psycopg.connect(self._superuser_conninfo(), autocommit=True, connect_timeout=5) as conn:
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (PG_USER,)).fetchone()
            verb = "ALTER" if exists else "CREATE"
            # Not a superuser: it owns the database (so its schemas) and may create the sink's roles and
            # tenant roles (CREATEROLE), nothing more. A cluster of earlier versions made it a superuser;
            # this takes that back at its next start.
            conn.execute(f"{verb} ROLE {PG_USER} WITH LOGIN NOSUPERUSER CREATEROLE PASSWORD '{PG_PASSWORD}'")
            if not exists:
                progress(f"postgres: created role {PG_USER}")
            if (
                conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (PG_DATABASE,)).fetchone()
                is None
            ):
                conn.execute(f"CREATE DATABASE {PG_DATABASE} OWNER {PG_USER}")
                progress(f"postgres: created database {PG_DATABASE}")
        if self.timescale_library().exists():
            # TimescaleDB is not a trusted extension: the superuser creates it, so that the sink's
            # CREATE EXTENSION IF NOT EXISTS (as the non-superuser owner) finds it there and does nothing.
            db = make_conninfo(self._superuser_conninfo(), dbname=PG_DATABASE)
            with psycopg.connect(db, autocommit=True, connect_timeout=5) as conn:
                conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")

    def _settings(self) -> str:
        return f"""# Written by localservices/harness.py on every start; edits are overwritten.
listen_addresses = '127.0.0.1'
port = {self.ports.postgres}
unix_socket_directories = '{self.sock}'
unix_socket_permissions = 0700
max_connections = 200
# Local development cluster only: no durability. fsync, synchronous_commit and full_page_writes are off for
# speed, so an operating-system crash or power loss can corrupt this cluster. It holds only throwaway data;
# delete .local/postgres to start afresh. Never copy these settings to a real deployment.
fsync = off
synchronous_commit = off
full_page_writes = off
log_line_prefix = '%m [%p] %q%u@%d '
# Commit times of rows (pg_xact_commit_timestamp): `make bench` measures window close -> row committed.
track_commit_timestamp = on
log_timezone = 'UTC'
timezone = 'UTC'
hba_file = '{self.hba_file}'
# TLS on TCP (sslmode=verify-full with the CA in {self.ca_file}); a client certificate is checked against the
# same CA where one is sent.
ssl = on
ssl_cert_file = '{self.tls_dir / "server.crt"}'
ssl_key_file = '{self.tls_dir / "server.key"}'
ssl_ca_file = '{self.ca_file}'
""" + (
            "# TimescaleDB must be preloaded before CREATE EXTENSION; it never calls home from here.\n"
            "shared_preload_libraries = 'timescaledb'\ntimescaledb.telemetry_level = off\n"
            if self.timescale_library().exists()
            else ""
        )

    def start(self, progress: Progress) -> None:
        user = self._os_user()
        self.dir.mkdir(parents=True, exist_ok=True)
        _ensure_traversable(self.dir, user, progress)
        _chown(self.dir, user)
        if self.sock != Path("/tmp"):
            self.sock.mkdir(mode=0o700, exist_ok=True)
            _chown(self.sock, user)
        for path in (self.log_file, self.admin_log):
            path.touch(exist_ok=True)
            _chown(path, user)
        if not (self.data / "PG_VERSION").exists():
            if self.data.exists() and any(self.data.iterdir()):
                raise self.error(
                    f"{self.data} exists but is not a PostgreSQL data directory (no PG_VERSION); "
                    "remove it to let a fresh cluster be created"
                )
            progress(f"postgres: initdb {self.data}")
            _run(
                "postgres",
                "initdb",
                _as_user(
                    user,
                    [
                        str(self.bin / "initdb"),
                        "-D",
                        str(self.data),
                        "-U",
                        PG_SUPERUSER,
                        "-E",
                        "UTF8",
                        "--locale=C",
                        "--auth-local=trust",
                        "--auth-host=scram-sha-256",
                    ],
                ),
                cwd=self.dir,
                log_file=self.admin_log,
                timeout=300,
            )
        elif _is_root():
            _chown(self.data, user, recursive=(self.data.stat().st_uid != pwd.getpwnam(user).pw_uid))
        conf = self.data / "postgresql.conf"
        include = "include_if_exists = 'plantstream.conf'"
        if include not in conf.read_text():
            with conf.open("a") as fh:
                fh.write(f"\n# Settings for the plantstream local cluster\n{include}\n")
        self.ensure_tls(user, progress)
        self.write_configs(mode=0o600)
        for path in self.config_files():
            _chown(path, user)
        self.ensure_ports_free(progress)
        with contextlib.suppress(OSError):
            os.chmod(self.data, 0o700)  # postgres refuses a data directory readable by others
        _run(
            "postgres",
            "pg_ctl start",
            _as_user(
                user,
                [str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log_file), "-W", "start"],
            ),
            cwd=self.dir,
            log_file=self.admin_log,
            timeout=60,
        )
        progress(f"postgres: starting on {self.endpoint()} (log: {self.log_file})")

    def stop(self, progress: Progress) -> None:
        pid = self.find_pid()
        if pid is None:
            progress("postgres: not running")
            return
        progress(f"postgres: stopping pid {pid} (pg_ctl stop -m fast)")
        try:
            _run(
                "postgres",
                "pg_ctl stop",
                _as_user(
                    self._os_user(),
                    [str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop"],
                ),
                cwd=self.dir,
                log_file=self.admin_log,
                timeout=90,
            )
        except ServiceError:
            if not _signal_and_wait(pid, 30, progress):
                raise
        if not _wait_exit(pid, 30):
            raise self.error(f"postmaster pid {pid} did not exit")
        progress("postgres: stopped")


class _Mosquitto(_Service):
    name = "mosquitto"
    binaries = {"/usr/sbin/mosquitto": "mosquitto"}
    system_service = "mosquitto"

    def __init__(self, root: Path, ports: Ports) -> None:
        super().__init__(root, ports)
        self.config = self.dir / "mosquitto.conf"
        self.persistence = self.dir / "data"

    def _binary(self) -> str:
        return shutil.which("mosquitto") or "/usr/sbin/mosquitto"

    def endpoint(self) -> str:
        return f"127.0.0.1:{self.ports.mosquitto}"

    def connection(self) -> str:
        return f"mqtt://127.0.0.1:{self.ports.mosquitto}"

    def listen_ports(self) -> list[int]:
        return [self.ports.mosquitto]

    def marker(self) -> str:
        return str(self.config)

    def config_files(self) -> dict[Path, str]:
        return {self.config: self._conf()}

    def is_system_instance(self, pid: int) -> bool:
        cmd = _cmdline(pid)
        if not cmd or Path(cmd[0]).name != "mosquitto":
            return False
        return "-c" not in cmd or any(arg.startswith("/etc/mosquitto") for arg in cmd)

    def check(self, timeout: float = 3.0) -> str | None:
        if not _port_open(self.ports.mosquitto):
            return f"nothing listening on {self.endpoint()}"
        import paho.mqtt.client as mqtt

        outcome: dict[str, str] = {}

        def on_connect(
            client: mqtt.Client, userdata: object, flags: object, reason_code: object, properties: object
        ) -> None:
            failed = bool(getattr(reason_code, "is_failure", False))
            outcome["result"] = f"CONNECT refused: {reason_code}" if failed else "ok"

        client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"plantstream-health-{os.getpid()}-{time.monotonic_ns()}",
        )
        client.on_connect = on_connect
        try:
            client.connect("127.0.0.1", self.ports.mosquitto, keepalive=10)
            deadline = time.monotonic() + timeout
            while "result" not in outcome and time.monotonic() < deadline:
                client.loop(timeout=0.1)
        except OSError as exc:
            return f"MQTT connect failed: {exc}"
        finally:
            with contextlib.suppress(Exception):
                client.disconnect()
                client.loop(timeout=0.05)
        result = outcome.get("result")
        if result is None:
            return f"no CONNACK within {timeout:.1f}s"
        return None if result == "ok" else result

    def _conf(self) -> str:
        return f"""# Written by localservices/harness.py on every start; edits are overwritten.
per_listener_settings false
listener {self.ports.mosquitto} 127.0.0.1
allow_anonymous true
persistence true
persistence_location {self.persistence}/
autosave_interval 60
max_inflight_messages 1000
max_queued_messages 100000
log_dest file {self.log_file}
log_type error
log_type warning
log_type notice
log_type information
connection_messages true
log_timestamp true
log_timestamp_format %Y-%m-%dT%H:%M:%S
"""

    def start(self, progress: Progress) -> None:
        binary = self._binary()
        if not Path(binary).exists():
            raise ServiceError("mosquitto: the mosquitto binary is missing; run install(['mosquitto'])")
        self.persistence.mkdir(parents=True, exist_ok=True)
        self.write_configs()
        self.log_file.touch(exist_ok=True)
        # Started as root, mosquitto drops privileges to the 'mosquitto' user, which must be able to write its
        # log and persistence files.
        if _is_root() and _user_ids("mosquitto") is not None:
            _ensure_traversable(self.dir, "mosquitto", progress)
            _chown(self.dir, "mosquitto", recursive=True)
        self.ensure_ports_free(progress)
        pid = _spawn([binary, "-c", str(self.config)], cwd=self.dir, out_file=self.out_file)
        _write_text(self.pid_file, f"{pid}\n")
        progress(f"mosquitto: started pid {pid} on {self.endpoint()} (log: {self.log_file})")


class _InfluxDB(_Service):
    name = "influxdb"
    binaries = {"/usr/bin/influxd": "influxdb"}
    system_service: str | None = "influxdb"

    def __init__(self, root: Path, ports: Ports) -> None:
        super().__init__(root, ports)
        self.config = self.dir / "influxdb.conf"
        self.out_file = self.log_file

    @property
    def http_port(self) -> int:
        return self.ports.influxdb

    @property
    def rpc_port(self) -> int:
        return self.ports.influxdb_rpc

    def _binary(self) -> str:
        return shutil.which("influxd") or "/usr/bin/influxd"

    def _http_extra(self) -> str:
        return ""

    def endpoint(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def connection(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def listen_ports(self) -> list[int]:
        return [self.http_port, self.rpc_port]

    def marker(self) -> str:
        return str(self.config)

    def config_files(self) -> dict[Path, str]:
        return {self.config: self._conf()}

    def is_system_instance(self, pid: int) -> bool:
        cmd = _cmdline(pid)
        if not cmd or Path(cmd[0]).name != "influxd":
            return False
        return "-config" not in cmd or any(arg.startswith("/etc/influxdb") for arg in cmd)

    def _databases(self, timeout: float) -> list[str]:
        query = urllib.parse.urlencode({"q": "SHOW DATABASES"})
        code, body = _http(f"{self.connection()}/query?{query}", timeout=timeout)
        if code != 200:
            raise OSError(f"SHOW DATABASES returned HTTP {code}: {body[:200]!r}")
        payload = json.loads(body)
        names: list[str] = []
        for result in payload.get("results", []):
            for series in result.get("series", []):
                names.extend(str(row[0]) for row in series.get("values", []))
        return names

    def ready(self, timeout: float = 3.0) -> str | None:
        if not _port_open(self.http_port):
            return f"nothing listening on {self.endpoint()}"
        try:
            code, _body = _http(f"{self.connection()}/ping", timeout=timeout)
        except (OSError, urllib.error.URLError) as exc:
            return f"GET /ping failed: {exc}"
        return None if code == 204 else f"GET /ping returned HTTP {code}"

    def check(self, timeout: float = 3.0) -> str | None:
        problem = self.ready(timeout)
        if problem is not None:
            return problem
        try:
            names = self._databases(timeout)
        except (OSError, ValueError, urllib.error.URLError) as exc:
            return f"SHOW DATABASES failed: {exc}"
        return None if INFLUX_DATABASE in names else f"database {INFLUX_DATABASE!r} does not exist"

    def provision(self, progress: Progress) -> None:
        code, body = _http(f"{self.connection()}/query", data={"q": f"CREATE DATABASE {INFLUX_DATABASE}"})
        if code != 200 or b'"error"' in body:
            raise self.error(f"CREATE DATABASE {INFLUX_DATABASE} failed: HTTP {code} {body[:200]!r}")

    def _conf(self) -> str:
        return f"""# Written by localservices/harness.py on every start; edits are overwritten.
reporting-disabled = true
bind-address = "127.0.0.1:{self.rpc_port}"

[meta]
  dir = "{self.dir / "meta"}"
  retention-autocreate = true
  logging-enabled = true

[data]
  dir = "{self.dir / "data"}"
  wal-dir = "{self.dir / "wal"}"
  wal-fsync-delay = "0s"
  query-log-enabled = false

[monitor]
  store-enabled = false

[http]
  enabled = true
  bind-address = "127.0.0.1:{self.http_port}"
  auth-enabled = false
  log-enabled = false
  pprof-enabled = false
  unix-socket-enabled = false
{self._http_extra()}
[logging]
  format = "auto"
  level = "info"
  suppress-logo = true
"""

    def start(self, progress: Progress) -> None:
        binary = self._binary()
        if not Path(binary).exists():
            raise ServiceError(f"{self.name}: the influxd binary is missing; run install(['{self.name}'])")
        for sub in ("meta", "data", "wal"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self.write_configs()
        self.ensure_ports_free(progress)
        # INFLUXDB_* variables override the config file; drop them so the file is the whole truth.
        env = {k: v for k, v in os.environ.items() if not k.startswith("INFLUXDB_")}
        pid = _spawn([binary, "-config", str(self.config)], cwd=self.dir, out_file=self.out_file, env=env)
        _write_text(self.pid_file, f"{pid}\n")
        progress(f"{self.name}: started pid {pid} on {self.endpoint()} (log: {self.log_file})")


class _InfluxDB18(_InfluxDB):
    """InfluxDB 1.8, for its 2.x compatibility API (``/api/v2/write``, Flux on ``/api/v2/query``).

    Debian packages only 1.6, which lacks that API, so setup builds ``influxd`` from an upstream source
    archive (``influxdb-1.8*.tar.gz`` in ``PLANTSTREAM_VENDOR_DIR``) with Go; without the archive (or a
    binary built before) the service is skipped and says why."""

    name = "influxdb18"
    binaries: dict[str, str] = {}
    system_service = None

    @property
    def http_port(self) -> int:
        return self.ports.influxdb18

    @property
    def rpc_port(self) -> int:
        return self.ports.influxdb18_rpc

    def _install_dir(self) -> Path:
        return Path("/usr/local/lib/plantstream") if _is_root() else self.root / "bin"

    def _binary(self) -> str:
        return str(self._install_dir() / "influxd-1.8")

    def _http_extra(self) -> str:
        return "  flux-enabled = true\n"

    def is_system_instance(self, pid: int) -> bool:
        return False

    def unavailable(self) -> str | None:
        if Path(self._binary()).exists() or _vendor_archive("influxdb-1.8*.tar.gz") is not None:
            return None
        return (
            f"no {self._binary()} and no source archive ({_vendor_dir()}/influxdb-1.8*.tar.gz, or set "
            "PLANTSTREAM_VENDOR_DIR); the InfluxDB 2.x-API tests are skipped"
        )

    def install_extra(self, progress: Progress) -> None:
        target = Path(self._binary())
        archive = _vendor_archive("influxdb-1.8*.tar.gz")
        if target.exists() or archive is None:
            return
        go = shutil.which("go")
        if go is None:
            progress(f"{self.name}: building InfluxDB 1.8 needs Go (golang); skipped")
            return
        build = self.root / "build" / archive.name.removesuffix(".tar.gz")
        log = self.root / "build" / "influxdb18.log"
        progress(f"{self.name}: building influxd from {archive.name} (about 2 minutes; log: {log})")
        shutil.rmtree(build, ignore_errors=True)
        build.mkdir(parents=True)
        _run(
            self.name,
            "unpack",
            ["tar", "-xzf", str(archive), "-C", str(build), "--strip-components=1"],
            log_file=log,
        )
        target.parent.mkdir(parents=True, exist_ok=True)
        # The archive's go.sum predates the module proxy's current answers for a few modules: -mod=mod lets
        # go fill them in (the build notes of the archive say the same).
        env = {**os.environ, "GOFLAGS": "-mod=mod -buildvcs=false"}
        partial = target.with_suffix(".partial")
        _run(
            self.name,
            "go build",
            [go, "build", "-o", str(partial), "./cmd/influxd"],
            cwd=build,
            log_file=log,
            env=env,
            timeout=1800,
        )
        partial.replace(target)
        shutil.rmtree(build, ignore_errors=True)
        progress(f"{self.name}: installed {target}")


_CLASSES: dict[str, type[_Service]] = {
    "kafka": _Kafka,
    "postgres": _Postgres,
    "mosquitto": _Mosquitto,
    "influxdb": _InfluxDB,
    "influxdb18": _InfluxDB18,
}


def _select(names: Iterable[str], ports: Ports | None = None) -> list[_Service]:
    if isinstance(names, str):
        names = [names]
    wanted = list(dict.fromkeys(names))
    unknown = [n for n in wanted if n not in _CLASSES]
    if unknown:
        raise ServiceError(f"unknown service(s) {', '.join(unknown)}; choose from {', '.join(SERVICE_NAMES)}")
    root = local_dir()
    p = ports or ports_from_env()
    # Always in SERVICE_NAMES order: Kafka, the slowest to boot, is launched first.
    return [_CLASSES[n](root, p) for n in SERVICE_NAMES if n in wanted]


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------


def install(names: Iterable[str] = SERVICE_NAMES, progress: Progress = print) -> None:
    """Install what the services need, skipping whatever is already present: Debian packages (postgresql-15,
    mosquitto, influxdb; apt-get update only runs when something is missing) and the Kafka jars (Maven)."""
    services = _select(names)
    _apt_install(
        sorted({pkg for svc in services for pkg in svc.missing_packages()}),
        lambda: sorted({pkg for svc in services for pkg in svc.missing_packages()}),
        progress,
    )
    for svc in services:
        svc.install_extra(progress)


BROWSER = Path("/usr/bin/chromium")


def install_browser(progress: Progress = print) -> Path:
    """Debian's Chromium, for the dashboard's browser test (driven headless over its DevTools protocol; no
    browser download). Returns its path."""
    _apt_install(
        [] if BROWSER.exists() else ["chromium"], lambda: [] if BROWSER.exists() else ["chromium"], progress
    )
    return BROWSER


def _apt_install(packages: list[str], missing: Callable[[], list[str]], progress: Progress) -> None:
    """apt-get install ``packages`` (apt-get update first; nothing when the list is empty)."""
    if not packages:
        return
    command = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    if not _is_root():
        raise ServiceError(
            f"install: missing Debian packages {', '.join(packages)}; as root run: "
            f"apt-get update && {shlex.join(command)}"
        )
    install_log = local_dir() / "install.log"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    progress(f"install: apt-get update and install {' '.join(packages)} (log: {install_log})")
    _run("install", "apt-get update", ["apt-get", "update"], log_file=install_log, env=env, timeout=900)
    _run("install", "apt-get install", command, log_file=install_log, env=env, timeout=1800)
    still = missing()
    if still:
        raise ServiceError(
            f"install: {', '.join(still)} still missing after apt-get install. Log: {install_log}"
        )


def up(
    names: Iterable[str] = SERVICE_NAMES,
    timeout: float = 90,
    progress: Progress = print,
    *,
    ports: Ports | None = None,
) -> dict[str, str]:
    """Make the services healthy and return ``{name: connection string}``.

    Idempotent: installs what is missing, leaves healthy services alone, starts the others, then waits (up to
    ``timeout`` seconds overall) until each answers a real request. Raises ServiceError naming the service and
    the log file (with its last lines) on failure.
    """
    services = _select(names, ports)
    with _lock():
        install([svc.name for svc in services], progress)
        started: list[_Service] = []
        skipped: set[str] = set()
        for svc in services:
            reason = svc.unavailable()
            if reason is not None:
                progress(f"{svc.name}: skipped: {reason}")
                skipped.add(svc.name)
                continue
            pid = svc.find_pid()
            if pid is not None:
                problem = svc.check()
                drift = svc.config_drift()
                if drift:
                    changed = ", ".join(str(path) for path in drift)
                    if problem is not None:
                        raise ServiceError(
                            f"{svc.name}: pid {pid} runs with another configuration than requested now "
                            f"({changed} would change; ports from the environment?) and does not answer on "
                            f"{svc.endpoint()}: {problem}. Run down(['{svc.name}']) and up() again to apply "
                            f"it. Log: {svc.log_file}"
                        )
                    progress(
                        f"{svc.name}: running pid {pid} was started with another configuration ({changed}); "
                        f"down(['{svc.name}']) and up() apply the new one"
                    )
                if problem is None:
                    progress(f"{svc.name}: already healthy (pid {pid}, {svc.endpoint()})")
                    continue
                progress(f"{svc.name}: pid {pid} is running but not healthy yet ({problem}); waiting for it")
                started.append(svc)
                continue
            primary = svc.listen_ports()[0]
            if _port_open(primary):
                holders = sorted(_listener_pids(primary))
                if not any(svc.is_system_instance(p) for p in holders) and svc.check() is None:
                    who = ", ".join(_describe(p) for p in holders) or "an unknown process"
                    progress(
                        f"{svc.name}: using the server already answering on {svc.endpoint()} ({who}); "
                        "it was not started by plantstream and down() will leave it alone"
                    )
                    continue
            svc.clean_stale_pid(progress)
            svc.start(progress)
            svc.launched_at = time.monotonic()
            started.append(svc)
        deadline = time.monotonic() + timeout
        for svc in started:
            svc.wait_healthy(deadline, timeout, progress)
            progress(f"{svc.name}: healthy at {svc.connection()}")
    return {svc.name: svc.connection() for svc in services if svc.name not in skipped}


def down(names: Iterable[str] = SERVICE_NAMES, progress: Progress = print) -> None:
    """Stop the services that up() started (found through their pid files) and wait until they have exited.
    Processes not started by up() (a system PostgreSQL on 5432, say) are never touched."""
    services = _select(names)
    with _lock():
        errors: list[str] = []
        for svc in reversed(services):
            try:
                svc.stop(progress)
            except ServiceError as exc:
                errors.append(str(exc))
        if errors:
            raise ServiceError("\n".join(errors))


def status(names: Iterable[str] = SERVICE_NAMES, *, ports: Ports | None = None) -> list[ServiceStatus]:
    """Each service: whether our process runs, whether it answers a real request, pid, endpoint, log."""
    result: list[ServiceStatus] = []
    for svc in _select(names, ports):
        pid = svc.find_pid()
        primary = svc.listen_ports()[0]
        listening = _port_open(primary)
        problem = svc.check(timeout=2.0) if listening else f"nothing listening on {svc.endpoint()}"
        healthy = problem is None
        if pid is not None:
            detail = "healthy" if healthy else f"running, not healthy: {problem}"
            if svc.config_drift():
                detail += " (started with another configuration than the current one; down/up to apply)"
        elif listening:
            holders = ", ".join(_describe(p) for p in sorted(_listener_pids(primary))) or "an unknown process"
            state = "answers" if healthy else f"does not answer ({problem})"
            detail = f"port {primary} held by {holders}, not started by plantstream; it {state}"
        elif (reason := svc.unavailable()) is not None:
            detail = f"not available: {reason}"
        else:
            stale = svc.stale_pid()
            detail = "not running" + (f" (stale pid file: pid {stale} is gone)" if stale is not None else "")
        result.append(
            ServiceStatus(
                name=svc.name,
                running=pid is not None,
                healthy=healthy,
                pid=pid,
                endpoint=svc.endpoint(),
                log_file=svc.log_file,
                detail=detail,
            )
        )
    return result
