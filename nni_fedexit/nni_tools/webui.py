"""Keep NNI's web UI / REST API private: bind the NNI manager to 127.0.0.1, and say where it listens.

What NNI 3.0 does
-----------------
The NNI manager (a node.js process, ``nni_node/main.js`` run by the ``node`` binary that ships in
the ``nni_node`` package) serves the web UI and the REST API with ``app.listen(port)``
(``nni_node/rest_server/index.js``): no host, so node binds every interface (``::`` dual-stack, or
``0.0.0.0``). NNI has no option to change that. Anyone who can reach the port can read the
experiment and control it (stop it, change its config, add trials). NNI's own "Web portal URLs"
log line lists every IPv4 address of the machine.

What this module does
---------------------
:func:`nni_manager_env` puts ``NODE_OPTIONS=--require <nni_fedexit/nni_tools/webui_localhost.js>`` into the
environment while the NNI manager is started (``nni.experiment.launcher._start_rest_server`` starts
it with ``Popen`` and the inherited environment, and NNI's node honours ``NODE_OPTIONS``). That
preload wraps ``net.Server.prototype.listen`` in the manager's process: a listen without a host,
or with a wildcard host, binds ``127.0.0.1`` (or the host given) instead; calls naming another
host, Unix sockets and handles are left alone. It then removes itself from the manager's
``NODE_OPTIONS``, so the tuner and the trials do not inherit it. No file of NNI is changed. The
local training service keeps working: the manager hands its tuner and its trials URLs on
``localhost`` (``ws://localhost:PORT/tuner``, the trial command channel), which reach 127.0.0.1.

How each way of starting the manager can use it
-----------------------------------------------
* Python ``Experiment`` / ``NasExperiment``: ``start()``, ``run()``, ``resume()`` and ``view()``
  all start the manager through ``nni.experiment.launcher``; wrap the call::

      with nni_manager_env():            # 127.0.0.1 only
          exp.run(port=8080)             # or exp.start(...), exp.view(...), exp.resume(...)
      print(web_ui_message(8080))

  Only the moment of starting matters (the variable is read when node starts), so wrapping
  ``start()`` is enough; wrapping ``run()`` also works.
* ``nnictl create / resume / view`` (``nni/tools/nnictl/launcher.py`` builds an ``Experiment`` and
  calls ``start()``, so the manager inherits nnictl's environment): set the variable for that one
  command::

      NODE_OPTIONS="$(python -c 'from nni_fedexit.nni_tools.webui import node_options; print(node_options())')" \\
          nnictl create --config config.yml --port 8080

* Either way, the web UI is then reached from another machine through an SSH tunnel:
  ``ssh -N -L 8080:127.0.0.1:8080 user@server`` and ``http://127.0.0.1:8080`` in the local browser.

Limits: the binding is for the *local* training service. Remote, Kubernetes and other training
services need the manager to be reachable from other machines (their trials call back to
``nni_manager_ip``); use ``host="all"`` there and a firewall. Only 127.0.0.1 / "localhost" can be
chosen: NNI's launcher, tuner and local trials connect to the manager at "localhost".
``os.environ`` is process-global, so do not start other node programs from other threads while
inside :func:`nni_manager_env`. The package data must ship ``webui_localhost.js``.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

LOCAL_HOST = "127.0.0.1"
ALL_HOSTS = "all"
PRELOAD = Path(__file__).resolve().with_name("webui_localhost.js")
HOST_ENV = "NNI_FEDEXIT_LISTEN_HOST"

_ALL_SPELLINGS = {"all", "*", "", "0.0.0.0", "::", "[::]", "::0", "0:0:0:0:0:0:0:0"}


def binds_all(host: str | None) -> bool:
    """True when ``host`` means NNI's own behaviour: every interface ("all", "0.0.0.0", "::", None)."""
    return host is None or host.strip().lower() in _ALL_SPELLINGS


def _check_host(host: str) -> str:
    host = host.strip()
    if not host or any(c.isspace() for c in host) or any(c in host for c in "\"'/\\"):
        raise ValueError(f"not a host name or IP address: {host!r}")
    return host


# NNI's launcher checks the manager at http://localhost:PORT, and the manager hands its tuner and
# its local trials ws/http URLs on "localhost": a binding they cannot reach there breaks the run
# (checked: with "::1" on a machine whose localhost is 127.0.0.1 only, Experiment.start fails).
MANAGER_HOSTS = (LOCAL_HOST, "localhost")


def _manager_host(host: str) -> str:
    host = _check_host(host)
    if host not in MANAGER_HOSTS:
        raise ValueError(
            f"cannot bind the NNI manager to {host!r}: NNI's launcher, tuner and local trials reach it "
            f"at 'localhost', so it must listen on {' or '.join(map(repr, MANAGER_HOSTS))}, or on all "
            f"interfaces (host='all', NNI's default; keep it private with a firewall)"
        )
    return host


def node_options(host: str = LOCAL_HOST) -> str:
    """The ``NODE_OPTIONS`` value that makes the NNI manager bind ``host`` (for nnictl, in a shell).

    For host "localhost" the shell also needs ``NNI_FEDEXIT_LISTEN_HOST=localhost``;
    :func:`nni_manager_env` sets both. ``""`` for "all" (nothing to add).
    """
    if binds_all(host):
        return ""
    _manager_host(host)
    if not PRELOAD.is_file():
        raise FileNotFoundError(f"{PRELOAD} is missing: reinstall nni-fedexit with its package data")
    path = str(PRELOAD)
    if any(c.isspace() or c in '"\\' for c in path):
        path = '"' + path.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"--require={path}"


@contextmanager
def nni_manager_env(host: str = LOCAL_HOST) -> Iterator[None]:
    """While inside, an NNI manager started by this process listens on ``host`` only.

    ``host`` "127.0.0.1" (default) or "localhost"; "all" / "0.0.0.0" / "::" keep NNI's default
    (every interface) and change nothing. Other addresses raise ``ValueError``: NNI's own clients
    reach the manager at "localhost". An existing ``NODE_OPTIONS`` is kept
    (ours is appended) and both variables are restored on exit.
    """
    if binds_all(host):
        yield
        return
    host = _manager_host(host)
    ours = node_options(host)
    saved = {name: os.environ.get(name) for name in ("NODE_OPTIONS", HOST_ENV)}
    try:
        os.environ["NODE_OPTIONS"] = " ".join(v for v in (saved["NODE_OPTIONS"] or "", ours) if v.strip())
        os.environ[HOST_ENV] = host
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _url(host: str, port: int, url_prefix: str | None = None) -> str:
    try:
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
    except ValueError:
        pass
    prefix = "/" + url_prefix.strip("/") if url_prefix and url_prefix.strip("/") else ""
    return f"http://{host}:{port}{prefix}"


def _interface_addresses() -> list[str]:
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil comes with NNI
        return []
    found = []
    for addrs in psutil.net_if_addrs().values():
        for addr in addrs:
            if addr.family == socket.AF_INET and addr.address not in found and addr.address != LOCAL_HOST:
                found.append(addr.address)
    return found


def web_ui_message(port: int, host: str | None = LOCAL_HOST, url_prefix: str | None = None) -> str:
    """Where the web UI is, and, when it listens on every interface, a warning and how to keep it private."""
    tunnel = f"ssh -N -L {port}:127.0.0.1:{port} user@server"
    if binds_all(host):
        hosts = [LOCAL_HOST, *_interface_addresses()]
        urls = [_url(h, port, url_prefix) for h in hosts]
        return (
            f"NNI web UI: {' '.join(urls)}\n"
            f"WARNING: the NNI web server listens on all network interfaces (port {port}); NNI has no "
            f"host option. Anyone who can reach this port can read and control the experiment. "
            f"Keep it private: block port {port} from other machines with a firewall rule (e.g. "
            f"`sudo ufw deny {port}/tcp`), or bind it to 127.0.0.1 (nni_fedexit.nni_tools.webui.nni_manager_env, "
            f"or NODE_OPTIONS from nni_fedexit.nni_tools.webui.node_options() for nnictl) and open it from your "
            f"own machine through an SSH tunnel: `{tunnel}`, then {_url(LOCAL_HOST, port, url_prefix)}"
        )
    host = _check_host(host)
    url = _url(host, port, url_prefix)
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if loopback:
        return (
            f"NNI web UI: {url} (listening on {host} only). From another machine: "
            f"`ssh -N -L {port}:{host}:{port} user@server`, then http://127.0.0.1:{port}"
        )
    return (
        f"NNI web UI: {url} (listening on {host} only: anyone who can reach that address can read "
        f"and control the experiment)"
    )


def print_web_ui_message(port: int, host: str | None = LOCAL_HOST, url_prefix: str | None = None,
                         file=None) -> None:
    """Print :func:`web_ui_message` to ``file`` (stderr by default)."""
    print(web_ui_message(port, host, url_prefix), file=file if file is not None else sys.stderr, flush=True)


def listening_hosts(port: int) -> set[str]:
    """The local addresses with a TCP socket in LISTEN state on ``port`` (e.g. {"127.0.0.1"} or {"::"})."""
    import psutil

    return {
        conn.laddr.ip
        for conn in psutil.net_connections(kind="tcp")
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port
    }


__all__ = [
    "ALL_HOSTS",
    "LOCAL_HOST",
    "PRELOAD",
    "binds_all",
    "listening_hosts",
    "nni_manager_env",
    "node_options",
    "print_web_ui_message",
    "web_ui_message",
]
