"""The local demo: S3 (a loopback moto server), a folder, a webhook and time clocks → one flow.

python scripts/demo.py            # start, drop files and objects, show the runs, stop
python scripts/demo.py --keep     # ... and keep listening until Ctrl-C
python scripts/demo.py --no-prefect   # untracked runs (no Prefect server)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

import boto3
import httpx
import yaml
from moto.server import ThreadedMotoServer
from rich.console import Console
from rich.table import Table

from cluster.config import config_from_dict
from cluster.runtime import LocalCluster

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "demo.yaml"
console = Console(width=None if sys.stdout.isatty() else 160)


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def start_s3() -> tuple[ThreadedMotoServer, str]:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request access log
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


def demo_config(endpoint: str, prefect: bool) -> dict:
    data = yaml.safe_load(CONFIG.read_text())
    for clock in data["flows"][0]["clocks"]:
        if clock["type"] == "s3":
            clock["endpoint_url"] = endpoint
    if not prefect:
        data["cluster"]["prefect"] = "off"
    if not port_free(data["cluster"]["ingress"]["port"]):
        data["cluster"]["ingress"]["port"] = 0
    return data


def show_runs(cluster: LocalCluster) -> list[dict]:
    state = json.loads((cluster.state_dir / "cluster.json").read_text())
    headers = {"Authorization": f"Bearer {state['admin_token']}"}
    runs = httpx.get(f"{cluster.ingress_url}/v1/runs", headers=headers, timeout=30).json()["runs"]
    table = Table("event id", "state", "attempts", "prefect flow run", title="flow runs")
    table.columns[0].overflow = table.columns[3].overflow = "fold"
    for r in sorted(runs, key=lambda r: r["created"]):
        table.add_row(
            r["event_id"], r["state"], str(r["attempts"]), r["prefect_flow_run_id"] or "-"
        )
    console.print(table)
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keep", action="store_true", help="keep listening until Ctrl-C")
    parser.add_argument("--no-prefect", action="store_true", help="run flows untracked")
    args = parser.parse_args()
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.setdefault(name, "demo")
    s3_server, endpoint = start_s3()
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket="landing")
    console.print(f"[bold]loopback S3[/bold] at {endpoint} (bucket 'landing')")
    config = config_from_dict(
        demo_config(endpoint, not args.no_prefect),
        CONFIG.parent,
        source=str(CONFIG),
        check_entrypoints=True,
    )
    inbox = Path(config.clock_specs()[0].options["path"])
    inbox.mkdir(parents=True, exist_ok=True)
    console.print("starting the cluster (Ray, Prefect server, actors) ...")
    t0 = time.monotonic()
    cluster = LocalCluster(config).start(timeout=180)
    try:
        console.print(
            f"listening after {time.monotonic() - t0:.1f}s; ingress {cluster.ingress_url}"
        )
        stamp = int(time.time())
        for i in range(3):
            (inbox / f"order-{stamp}-{i}.json").write_text(json.dumps({"order": i}))
            s3.put_object(
                Bucket="landing",
                Key=f"incoming/report-{stamp}-{i}.csv",
                Body=f"id,value\n{i},{i * 10}\n".encode(),
            )
        console.print(f"dropped 3 files into {inbox} and 3 objects into s3://landing/incoming/")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            st = cluster.call("supervisor", "status")["flows"][0]
            if st["runs"]["completed"] >= 7:  # 6 events + at least one interval tick
                break
            time.sleep(0.5)
        show_runs(cluster)
        if cluster.prefect is not None:
            console.print(
                f"See them in the Prefect UI: [bold]{cluster.prefect.ui_url}[/bold]"
                " (tags tenant:default, flow:ingest, event:<id>)"
            )
        if args.keep:
            console.print("listening; Ctrl-C to stop")
            while True:
                time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        console.print("stopping ...")
        cluster.stop()
        s3_server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
