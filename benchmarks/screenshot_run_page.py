"""Photograph segflow runs in the Prefect UI, for the README (run when its figures change).

Starts a real ``prefect server`` on a free port (its own PREFECT_HOME), runs
``segflow run`` on two copies of the bundled aerial tile and a damaged one (so one item task
is red: a *Failed* run), then opens the flow run page, the items table and a quick-look
artifact in headless Chromium (Debian's ``chromium`` package). Then two runs on one store
at once: the second waits in the store's queue (photographed while it waits), the first is
cancelled through the API (photographed once *Cancelled*). Writes PNGs:

    python benchmarks/screenshot_run_page.py --out benchmarks/figures

Needs ``chromium`` on PATH (``apt-get install chromium``); nothing here runs in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from _prefect_server import free_port, prefect_server

ROOT = Path(__file__).resolve().parents[1]


def api(url: str, path: str, body: dict) -> Any:
    request = urllib.request.Request(
        f"{url}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def shoot(chromium: str, page: str, out: Path, *, width: int, height: int) -> None:
    subprocess.run(
        [
            chromium,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--window-size={width},{height}",
            "--virtual-time-budget=20000",  # let the single-page app fetch and draw
            f"--screenshot={out}",
            page,
        ],
        check=True,
        capture_output=True,
        timeout=180,
    )
    print(f"wrote {out} ({out.stat().st_size // 1024} KiB) of {page}")


def wait_for(what: str, check: Any, timeout: float = 180.0) -> Any:
    """Poll ``check()`` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(1.0)
    raise SystemExit(f"gave up waiting for {what}")


def runs_by_state(url: str) -> dict[str, list[dict[str, Any]]]:
    runs = api(url, "/api/flow_runs/filter", {"sort": "EXPECTED_START_TIME_DESC", "limit": 20})
    out: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        out.setdefault(str(run.get("state_type")), []).append(run)
    return out


def queued_and_cancelled(url: str, command: list[str], env: dict[str, str], work: Path,
                         shot: Any) -> None:  # fmt: skip
    """Two runs on one store: photograph the second while it waits for the store, cancel
    the first and photograph it once *Cancelled*."""
    tiles = work / "night"
    tiles.mkdir()
    source = ROOT / "tests" / "data" / "aerial" / "RGB.byte.tif"
    for i in range(48):
        shutil.copy(source, tiles / f"ortho_{i:02d}.tif")
    store = work / "night.zarr"
    night = [*command[:3], "--set", f"input.path={tiles}", "--set", f"output.store={store}",
             "--set", "blocks.shape=[256,256]", "--set", "output.chunks=[256,256]"]  # fmt: skip
    before = {r["id"] for rs in runs_by_state(url).values() for r in rs}
    first = subprocess.Popen(night, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def new_running() -> list[dict[str, Any]]:
        return [r for r in runs_by_state(url).get("RUNNING", []) if r["id"] not in before]

    (holder,) = wait_for("the first run to start", new_running)
    time.sleep(8)  # let it take the store
    # The second (the same config) as a deployment's run is, the flow in a process of its
    # own: it waits in the store's queue, visible in the UI (`segflow run` would wait for
    # the store before making a flow run).
    overrides = [night[i + 1] for i in range(3, len(night), 2)]
    flow = (
        "import sys; from segflow.flows.segment import segment_collection as f; "
        "f(sys.argv[1], sys.argv[2:])"
    )
    second = subprocess.Popen(
        [sys.executable, "-c", flow, command[2], *overrides],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    waiting = wait_for(
        "the second run", lambda: [r for r in new_running() if r["id"] != holder["id"]]
    )
    time.sleep(10)  # its log says whom it waits for
    shot(f"{url}/runs/flow-run/{waiting[0]['id']}", "prefect-queued-run.png")
    api(url, f"/api/flow_runs/{holder['id']}/set_state",
        {"state": {"type": "CANCELLING", "name": "Cancelling"}, "force": True})  # fmt: skip
    wait_for(
        "the first run to end Cancelled",
        lambda: any(r["id"] == holder["id"] for r in runs_by_state(url).get("CANCELLED", [])),
    )
    shot(f"{url}/runs/flow-run/{holder['id']}", "prefect-cancelled-run.png")
    first.wait(timeout=120)
    second.wait(timeout=600)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "figures")
    parser.add_argument("--width", type=int, default=1500)
    parser.add_argument("--height", type=int, default=1100)
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("needs Debian's chromium on PATH: apt-get install chromium")
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="segflow-screenshot-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "PREFECT_HOME": str(work / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_API_URL": f"{url}/api",
    }
    try:
        with prefect_server(env, port):
            tiles = work / "tiles"
            tiles.mkdir()
            shutil.copy(ROOT / "tests" / "data" / "aerial" / "RGB.byte.tif", tiles / "ortho_a.tif")
            shutil.copy(ROOT / "tests" / "data" / "aerial" / "RGB.byte.tif", tiles / "ortho_b.tif")
            data = (ROOT / "tests" / "data" / "aerial" / "RGB.byte.tif").read_bytes()
            (tiles / "ortho_cut.tif").write_bytes(data[: len(data) // 3])  # a tile cut short
            run_env = {**env, "PREFECT_API_URL": f"{url}/api"}
            command = [
                str(Path(sys.executable).parent / "segflow"),
                "run",
                str(ROOT / "configs" / "aerial.yaml"),
                "--set", f"input.path={tiles}",
                "--set", f"output.store={work / 'aerial.zarr'}",
            ]  # fmt: skip
            result = subprocess.run(command, env=run_env, capture_output=True, text=True)
            print(result.stdout[-2000:])
            runs = api(url, "/api/flow_runs/filter", {"sort": "START_TIME_DESC", "limit": 1})
            run_id = runs[0]["id"]
            page = f"{url}/runs/flow-run/{run_id}"
            shoot(chromium, page, args.out / "prefect-run-page.png", width=args.width,
                  height=args.height)  # fmt: skip
            artifacts = api(url, "/api/artifacts/filter", {"sort": "CREATED_DESC", "limit": 50})
            wanted = {  # figure name -> (how its artifact is told apart, page height)
                "prefect-progress.png": (lambda a: a.get("type") == "progress", 260),
                "prefect-items-table.png": (
                    lambda a: str(a.get("key") or "").endswith("-items"),
                    480,
                ),
                "prefect-quicklook.png": (
                    lambda a: "quick look" in str(a.get("description")),
                    480,
                ),
            }
            for name, (match, height) in wanted.items():
                artifact = next((a for a in artifacts if match(a)), None)
                if artifact is None:
                    print(f"no artifact for {name}")
                    continue
                shoot(chromium, f"{url}/artifacts/artifact/{artifact['id']}", args.out / name,
                      width=args.width, height=height)  # fmt: skip

            def shot(page: str, name: str) -> None:
                shoot(chromium, page, args.out / name, width=args.width, height=args.height)

            queued_and_cancelled(url, command, run_env, work, shot)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
