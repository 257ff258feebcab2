"""Photograph a segflow run in the Prefect UI, for the README (run when its figures change).

Starts a real ``prefect server`` on a free port (its own PREFECT_HOME), runs
``segflow run`` on two copies of the bundled aerial tile and a damaged one (so one item task
is red), then opens the flow run page, the items table and a quick-look artifact in
headless Chromium (Debian's ``chromium`` package) and writes PNGs:

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
import urllib.request
from pathlib import Path

from _prefect_server import free_port, prefect_server

ROOT = Path(__file__).resolve().parents[1]


def api(url: str, path: str, body: dict) -> object:
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
            run_id = runs[0]["id"]  # type: ignore[index]
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
                artifact = next((a for a in artifacts if match(a)), None)  # type: ignore[union-attr]
                if artifact is None:
                    print(f"no artifact for {name}")
                    continue
                shoot(chromium, f"{url}/artifacts/artifact/{artifact['id']}", args.out / name,
                      width=args.width, height=height)  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
