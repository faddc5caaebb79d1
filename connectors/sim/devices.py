"""What `plantstream simulate` starts for a topology's OPC UA and BACnet sources.

An OPC UA source whose endpoint is on this machine gets the simulated plant at that endpoint (with
Basic256Sha256 and the source's user when the source asks for them). A BACnet source gets one simulated
air-handling unit per device with a loopback address, or, with discovery only, one unit answering
Who-Is on the discovery port. Devices elsewhere are real and left alone.
"""

from __future__ import annotations

import ipaddress
import logging
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from connectors.bacnet.config import BacnetSource
from connectors.opcua.config import OpcUaSource
from connectors.sim import launch

log = logging.getLogger("plantstream.sim")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def plan(sources: list[Any]) -> list[tuple[str, str, list[str]]]:
    """(kind, address, extra arguments) of each simulator the sources need."""
    out: list[tuple[str, str, list[str]]] = []
    for src in sources:
        if isinstance(src, OpcUaSource):
            url = urlparse(src.endpoint)
            if not _loopback(url.hostname or ""):
                continue
            args: list[str] = []
            if src.security.policy != "None":
                args.append("--security")
            if src.username is not None and src.password is not None:
                args += ["--user", f"{src.username}:{src.password.get_secret_value()}"]
            if all(o[1] != src.endpoint for o in out):
                out.append(("opcua", src.endpoint, args))
        elif isinstance(src, BacnetSource):
            port = 47808
            if src.discovery is not None and src.discovery.target:
                port = int(src.discovery.target.rsplit(":", 1)[1])
            devices = [(d.instance, d.address) for d in src.devices]
            if not devices and src.discovery is not None:
                devices = [(max(src.discovery.low, 1), f"127.0.0.2:{port}")]
            for instance, address in devices:
                if address is None:
                    address = f"127.0.0.{2 + len(out)}:{port}"
                host, _, p = address.partition(":")
                if _loopback(host):
                    # /8 on loopback: the device hears Who-Is sent to 127.255.255.255 (see bacnet_ahu).
                    out.append(("bacnet", f"{host}/8:{p or 47808}", ["--instance", str(instance)]))
    return out


def start(sources: list[Any], log_dir: Path) -> list[subprocess.Popen[bytes]]:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for kind, address, args in plan(sources):
            if kind == "opcua":
                procs.append(launch.start_opcua_plant(address, args=args, log=log_dir / "opcua-plant.log"))
                log.info("simulated OPC UA plant at %s", address)
            else:
                instance = int(args[args.index("--instance") + 1])
                rest = [
                    a
                    for i, a in enumerate(args)
                    if i not in (args.index("--instance"), args.index("--instance") + 1)
                ]
                procs.append(
                    launch.start_bacnet_ahu(
                        address, instance, args=rest, log=log_dir / f"bacnet-ahu-{instance}.log"
                    )
                )
                log.info("simulated BACnet AHU %d at %s", instance, address)
    except Exception:
        stop(procs)
        raise
    return procs


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        launch.stop(p)
