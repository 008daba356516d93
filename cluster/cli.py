"""The ``listeners`` command line (SPEC section 5)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from actors.errors import ListenerError
from cluster.client import Client, ClusterDown
from cluster.config import ClusterConfig, load_config
from cluster.runtime import LocalCluster, pid_alive, read_state, reap_crashed_driver

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
dlq_app = typer.Typer(no_args_is_help=True, help="Dead letters: list and replay.")
app.add_typer(dlq_app, name="dlq")
# Piped output keeps whole rows instead of squeezing tables into 80 columns.
out = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True)

ConfigOpt = Annotated[
    str | None,
    typer.Option(
        "-c", "--config", help="cluster config (default: $LISTENERS_CONFIG or ./listeners.yaml)"
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="one JSON document on stdout")]


def fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", markup=True, highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _config(path: str | None, check_entrypoints: bool = False) -> ClusterConfig:
    path = path or os.environ.get("LISTENERS_CONFIG") or "listeners.yaml"
    try:
        return load_config(path, check_entrypoints=check_entrypoints)
    except ListenerError as exc:
        raise fail(str(exc)) from None


def _emit_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, default=str) + "\n")


@app.command()
def validate(config: Annotated[str, typer.Argument(help="config file")]) -> None:
    """Check a config file: exit 0 when valid, else name the file, key path and problem."""
    cfg = _config(config, check_entrypoints=True)
    clocks = sum(len(f.clocks) for f in cfg.flows)
    out.print(f"{config}: ok ({len(cfg.flows)} flows, {clocks} clocks)")


@app.command()
def up(
    config: Annotated[str, typer.Argument(help="config file")],
    detach: Annotated[bool, typer.Option("--detach", help="run in the background")] = False,
    timeout: Annotated[float, typer.Option(help="seconds to wait for every clock")] = 180.0,
) -> None:
    """Start the cluster. Foreground: runs until Ctrl-C, then stops cleanly."""
    cfg = _config(config, check_entrypoints=True)
    if detach:
        raise typer.Exit(_detach(config, cfg, timeout))
    stop = {"flag": False}

    def on_signal(signum: int, frame: object) -> None:
        stop["flag"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    cluster = LocalCluster(cfg)
    try:
        cluster.start(timeout=timeout)
    except ListenerError as exc:
        raise fail(str(exc)) from None
    out.print(f"listening: {len(cfg.flows)} flows; ingress {cluster.ingress_url}")
    if cluster.prefect is not None:
        out.print(f"Prefect UI: {cluster.prefect.ui_url}")
    try:
        while not stop["flag"]:
            time.sleep(0.2)
    finally:
        out.print("stopping ...")
        cluster.stop()
        out.print("stopped")


def _detach(config: str, cfg: ClusterConfig, timeout: float) -> int:
    logs = cfg.state_path / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / "driver.log", "ab") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cluster.cli",
                "up",
                str(Path(config).resolve()),
                "--timeout",
                str(timeout),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout + 30
    while time.monotonic() < deadline:
        state = read_state(cfg.state_path) or {}
        if state.get("pid") == proc.pid and state.get("state") == "listening":
            out.print(f"listening (pid {proc.pid}); ingress {state['ingress_url']}")
            return 0
        if proc.poll() is not None or (state.get("pid") == proc.pid and state["state"] == "failed"):
            reason = state.get("error") if state.get("pid") == proc.pid else None
            tail = (logs / "driver.log").read_text(errors="replace")[-2000:]
            err.print(f"error: cluster did not start: {reason or tail}")
            proc.terminate()
            return 1
        time.sleep(0.2)
    proc.terminate()
    err.print(f"error: cluster not listening after {timeout:.0f}s; see {logs / 'driver.log'}")
    return 1


@app.command()
def down(
    config: ConfigOpt = None,
    timeout: Annotated[float, typer.Option(help="seconds to wait for a clean stop")] = 60.0,
) -> None:
    """Stop a detached cluster and its actors."""
    cfg = _config(config)
    state = read_state(cfg.state_path) or {}
    pid = int(state.get("pid", 0))
    if not pid or state.get("state") in ("stopped", "failed") or not pid_alive(pid):
        reap_crashed_driver(state)
        out.print("no cluster running")
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if pid_alive(pid):
        os.killpg(pid, signal.SIGKILL)
        raise fail(f"cluster (pid {pid}) did not stop in {timeout:.0f}s; killed")
    out.print("stopped")


@app.command()
def submit(
    config: Annotated[str, typer.Argument(help="config file")],
    address: Annotated[
        str, typer.Option("--address", help="Ray Jobs address, e.g. http://head:8265")
    ],
    timeout: Annotated[float, typer.Option(help="seconds to wait for every clock")] = 300.0,
) -> None:
    """Run the cluster as a Ray Job on an existing Ray cluster (returns once it listens)."""
    from cluster.jobs import submit as submit_job

    cfg = _config(config, check_entrypoints=True)
    try:
        job_id = submit_job(cfg, Path(config), address, timeout)
    except ListenerError as exc:
        raise fail(str(exc)) from None
    out.print(
        f"listening as Ray job {job_id}; stop it with `ray job stop {job_id} --address {address}`"
    )


def _client(config: str | None) -> Client:
    return Client(_config(config))


def _ref(client: Client, flow: str) -> tuple[str, str]:
    try:
        f = client.config.find_flow(flow)
    except ListenerError as exc:
        raise fail(str(exc)) from None
    return f.tenant, f.name


@app.command()
def status(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Per flow: state, clocks, event counts, run counts, last event age."""
    doc = _guard(lambda: _client(config).status())
    if as_json:
        _emit_json(doc)
        return
    table = Table(
        "flow",
        "state",
        "clocks",
        "events seen/acc/dup/rej",
        "runs pend/run/done/fail/dead",
        "last event",
    )
    for f in doc["flows"]:
        e, r = f["events"], f["runs"]
        clocks = ", ".join(f"{c['name']}:{c['state']}" for c in f["clocks"])
        age = f.get("last_event_age")
        table.add_row(
            f"{f['tenant']}/{f['flow']}",
            f["state"],
            clocks,
            "/".join(str(e.get(k, 0)) for k in ("seen", "accepted", "duplicate", "rejected")),
            "/".join(
                str(r.get(k, 0)) for k in ("pending", "running", "completed", "failed", "dead")
            ),
            "-" if age is None else f"{age:.1f}s ago",
        )
    out.print(table)
    ledger = doc.get("ledger") or {"ok": True}
    if "error" in ledger:
        out.print(f"[bold red]ledger unreachable[/]: {ledger['error']} (counts as last read)")
    elif not ledger["ok"]:
        out.print("[bold red]ledger outage[/]: no run starts until the ledger answers again")


@app.command()
def pause(flow: str, config: ConfigOpt = None) -> None:
    """Stop starting runs for one flow (events keep being accepted and wait)."""
    client = _client(config)
    tenant, name = _ref(client, flow)
    _guard(lambda: client.pause(tenant, name, "pause"))
    out.print(f"{tenant}/{name}: paused")


@app.command()
def resume(flow: str, config: ConfigOpt = None) -> None:
    """Start runs again for a paused flow (waiting events run first)."""
    client = _client(config)
    tenant, name = _ref(client, flow)
    _guard(lambda: client.pause(tenant, name, "resume"))
    out.print(f"{tenant}/{name}: listening")


@app.command()
def emit(
    flow: str,
    payload: Annotated[str, typer.Option("--payload", help="JSON object")],
    event_id: Annotated[str | None, typer.Option("--id", help="event id")] = None,
    config: ConfigOpt = None,
) -> None:
    """Inject an event as the webhook would."""
    client = _client(config)
    tenant, name = _ref(client, flow)
    try:
        body = json.loads(payload)
    except ValueError as exc:
        raise fail(f"--payload is not valid JSON: {exc}") from None
    r = _guard(lambda: client.emit(tenant, name, body, event_id))
    if r.status_code >= 300:
        raise fail(f"HTTP {r.status_code}: {r.json().get('error', r.text)}")
    doc = r.json()
    out.print(f"{doc['status']}: {tenant}/{name} event {doc['id']}")


@app.command()
def runs(
    flow: Annotated[str | None, typer.Option("--flow", help="tenant/flow or flow")] = None,
    state: Annotated[str | None, typer.Option("--state")] = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Flow runs with event id, state, attempts and Prefect flow-run id."""
    rows = _guard(lambda: _client(config).runs(flow, state))
    if as_json:
        _emit_json({"runs": rows})
        return
    table = Table("flow", "event id", "state", "attempts", "prefect flow run", "error")
    for r in rows:
        table.add_row(
            f"{r['tenant']}/{r['flow']}",
            r["event_id"],
            r["state"],
            str(r["attempts"]),
            r["prefect_flow_run_id"] or "-",
            (r["error"] or "")[:60],
        )
    out.print(table)


@dlq_app.command("list")
def dlq_list(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Dead letters: events whose runs failed every attempt."""
    rows = _guard(lambda: _client(config).dead())
    dead = [{k: r[k] for k in ("tenant", "flow", "event_id", "error", "attempts")} for r in rows]
    if as_json:
        _emit_json({"dead": dead})
        return
    table = Table("flow", "event id", "attempts", "error")
    for d in dead:
        table.add_row(
            f"{d['tenant']}/{d['flow']}", d["event_id"], str(d["attempts"]), (d["error"] or "")[:80]
        )
    out.print(table)


@dlq_app.command("replay")
def dlq_replay(
    ids: Annotated[list[str] | None, typer.Argument()] = None, config: ConfigOpt = None
) -> None:
    """Re-run dead letters (all of them when no ID is given)."""
    replayed = _guard(lambda: _client(config).replay(ids or []))
    out.print(f"replayed {len(replayed)} dead letters")


def _guard(fn: Any) -> Any:
    try:
        return fn()
    except ClusterDown as exc:
        raise fail(f"{exc}; start it with `listeners up`") from None
    except ListenerError as exc:
        raise fail(str(exc)) from None


def main() -> None:
    app()


if __name__ == "__main__":
    main()
