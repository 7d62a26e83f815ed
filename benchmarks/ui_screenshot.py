"""The README's MLflow UI recipe, clicked through in a real browser, with screenshots.

Serves a tracking store with ``mlflow ui`` on 127.0.0.1, opens it in headless Chromium (Debian's
``chromium`` package driven by Playwright from pip; Playwright's own browser download is not
used) with a fresh profile, as a new user would, and follows "Comparing runs in the MLflow UI" of
the README step by step. It fails (exit status 1, saying which step) where the UI does not do what
the recipe says.

1. The experiment's link ``http://127.0.0.1:PORT/#/experiments/<id>/runs?workflowType=machine_learning``
   must open the "Runs" page in "Model training" mode -> ``ui_runs_view.png``. For comparison the
   script also opens the bare ``#/experiments/<id>`` and prints where MLflow sent it.
2. Search ``tags.`maskdm.stage` = 'fid'``, switch to the Chart view, Group by the tag
   ``maskdm.model_stage`` and the param ``pruning_ratio``, Add chart > Scatter chart with X axis
   ``pruning_ratio`` and Y axis ``fid_shapes`` (or ``--metric``) -> ``ui_arms_recipe.png`` (the
   page); then the chart full screen -> ``ui_arms_chart.png``. The run list and the chart's
   legend must both hold groups of the two finetune arms (``finetuned`` and
   ``finetuned_no_mask_training``).

3. (``--native``) MLflow's own records of the stages: the runs table with the sweep's runs
   expanded under the driver's run, whose Dataset column must name the stages' dataset inputs ->
   ``ui_runs_datasets.png``; a finetune run's page, whose Datasets must list its ``training`` and
   ``evaluation`` inputs with their digests -> ``ui_finetune_run.png``; its System metrics tab ->
   ``ui_finetune_system_metrics.png``; its Model metrics tab must hold the ``preview`` image card
   (the grids logged per checkpoint with a step), its picture loaded in the card's full-screen view,
   with the step slider -> ``ui_finetune_previews.png``. ``--native`` alone skips steps 1-2 (any store with a
   ``main`` sweep will do)::

    python benchmarks/ui_screenshot.py --store /tmp/native-ui --native --out docs/images

Setup, then the command that made docs/images/ui_arms_chart.png (and ui_arms_recipe.png, ui_runs_view.png)::

    apt-get install -y chromium && pip install playwright
    python benchmarks/ui_screenshot.py --store /tmp/ui-demo --build --out docs/images

``--build`` first runs, in the store folder (``mlflow.db`` and ``mlruns/`` there), a small demo
sweep: ``maskdm main`` with :data:`BUILD_ARGS` (two ratios, 10 finetune steps, 128 samples per
model; the demo preset's mask training, whose masks differ from the pruning masks, so the two arms
score apart). It trains the demo model first if the store has none (minutes); copying in a
store that already holds one (``mlflow.db`` and its artifact folder) saves that. A driver run
that is already in the store is reused stage by stage. Without ``--build`` the store is used as
it is; ``--experiment`` picks the experiment (default: the one of the newest ``fid`` run).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: The demo sweep behind the screenshot: small enough for minutes on a loaded 2-core CPU.
BUILD_ARGS = [
    "--ratios", "0.3,0.7",
    "--set", "finetune.num_iters=10,finetune.save_model_steps=10,"
             "sample.total_samples=128,sample.batch_size=128",
]
FID_FILTER = "tags.`maskdm.stage` = 'fid'"
FINETUNE_FILTER = "tags.`maskdm.stage` = 'finetune' and attributes.status = 'FINISHED'"
#: Set by --native: find the experiment by its newest finetune run, and run step 3 only.
NATIVE_ONLY = False
GROUP_TAG = "maskdm.model_stage"
ARM_GROUPS = ("finetuned", "finetuned_no_mask_training")
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
VIEWPORT = {"width": 1920, "height": 1080}


class StepFailed(Exception):
    pass


#: Where --debug saves a screenshot after every step (None: not saved).
DEBUG_DIR: Path | None = None


def snap(page, name: str) -> None:
    if DEBUG_DIR is not None:
        page.screenshot(path=str(DEBUG_DIR / f"debug-{name}.png"))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True, help="folder holding mlflow.db (and the artifacts it names)")
    p.add_argument("--build", action="store_true", help="first run the small demo sweep (BUILD_ARGS) in the store")
    p.add_argument("--experiment", default=None, help="experiment name or ID [default: the newest fid run's]")
    p.add_argument("--metric", default="fid_shapes", help="the chart's y axis [fid_shapes: the offline demo's FID]")
    p.add_argument("--out", default=str(REPO / "docs" / "images"),
                   help="folder for ui_arms_chart.png, ui_arms_recipe.png and ui_runs_view.png")
    p.add_argument("--port", type=int, default=0, help="port of mlflow ui [default: a free one]")
    p.add_argument("--wait", type=float, default=180.0, help="seconds to wait for the server and each page element")
    p.add_argument("--debug", action="store_true", help="also save a screenshot after every step (debug-*.png in --out)")
    p.add_argument("--native", action="store_true",
                   help="only step 3: the Dataset column, a finetune run's datasets and system metrics")
    return p.parse_args()


def store_uri(store: Path) -> str:
    return f"sqlite:///{store.resolve() / 'mlflow.db'}"


def build_store(store: Path) -> None:
    store.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MLFLOW_TRACKING_URI": store_uri(store), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    command = ["maskdm", "main", *BUILD_ARGS]
    print("building the demo store:", " ".join(command), f"(in {store})", flush=True)
    subprocess.run(command, cwd=store, env=env, check=True)


def find_experiment(store: Path, ref: str | None) -> tuple[str, str]:
    """(ID, name) of the experiment to show."""
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(store_uri(store))
    client = MlflowClient()
    if ref:
        experiment = client.get_experiment_by_name(ref) or (client.get_experiment(ref) if ref.isdigit() else None)
        if experiment is None:
            raise StepFailed(f"no experiment '{ref}' in {store_uri(store)}")
        return experiment.experiment_id, experiment.name
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, FINETUNE_FILTER if NATIVE_ONLY else FID_FILTER, order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise StepFailed(f"no fid run in {store_uri(store)}: build one with --build")
    experiment = client.get_experiment(runs[0].info.experiment_id)
    return experiment.experiment_id, experiment.name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ui(store: Path, port: int, wait: float) -> subprocess.Popen:
    command = ["mlflow", "ui", "--backend-store-uri", store_uri(store), "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(command, cwd=store, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise StepFailed(f"mlflow ui exited with status {server.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as answer:
                if answer.status == 200:
                    return server
        except OSError:
            pass
        time.sleep(2)
    stop(server)
    raise StepFailed(f"mlflow ui did not answer on port {port} within {wait:.0f} s")


def stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


def close_assistant(page) -> None:
    """The MLflow Assistant side panel takes a fifth of the window; close it if it is open."""
    if page.get_by_text("MLflow Assistant").count() == 0:
        return
    for button in page.locator("button[aria-label='Close']").all():
        if button.is_visible():
            button.click(timeout=5000)
            page.wait_for_timeout(1000)
            return


def pick(page, trigger, text: str) -> None:
    """Open the Group by dropdown, type ``text`` into its search box and click the entry that is exactly it."""
    trigger.click()
    page.keyboard.type(text)
    page.wait_for_timeout(1000)
    option = page.get_by_role("option", name=text, exact=True)
    if option.count() == 0:
        option = page.get_by_text(text, exact=True).last
    option.first.click()
    page.wait_for_timeout(800)


def pick_axis(page, select_input, text: str) -> None:
    """Choose ``text`` in one of the chart dialog's axis selects (a searchable select)."""
    select_input.click(force=True)  # the select's current value lies over its search input
    page.keyboard.type(text)
    page.wait_for_timeout(1000)
    options = page.locator(f".du-bois-light-select-item-option[title='{text}']")
    visible = [o for o in options.all() if o.is_visible()]
    if not visible:
        raise StepFailed(f"the chart dialog offers no '{text}' for its axis")
    visible[0].click()
    page.wait_for_timeout(800)


def run_recipe(base: str, experiment_id: str, metric: str, out: Path, wait_ms: int) -> None:
    from playwright.sync_api import sync_playwright

    runs_url = f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=BROWSER_ARGS)
        try:
            # What a new user gets from the bare experiment link (no workflowType in the URL).
            context = browser.new_context(viewport=VIEWPORT)
            page = context.new_page()
            page.goto(f"{base}/#/experiments/{experiment_id}")
            page.wait_for_url(re.compile(rf"#/experiments/{experiment_id}/\w"), timeout=wait_ms)
            page.wait_for_timeout(3000)
            print(f"bare experiment link #/experiments/{experiment_id} opened on: {page.url.split('#', 1)[1]}")
            snap(page, "0-bare-link")
            if "workflowType=genai" in page.url:
                got_it = page.get_by_role("button", name="Got it")  # a first-visit popover over the page
                if got_it.count() and got_it.first.is_visible():
                    got_it.first.click()
                    page.wait_for_timeout(1000)
                # The switch at the top left, once: the browser keeps the choice for later visits.
                page.get_by_role("button", name="Model training", exact=True).click()
                page.wait_for_url(re.compile(r"/runs"), timeout=wait_ms)
                page.goto(f"{base}/#/experiments/{experiment_id}")
                page.wait_for_url(re.compile(rf"#/experiments/{experiment_id}/\w"), timeout=wait_ms)
                page.wait_for_timeout(3000)
                print(f"after one click on Model training, the same link opens on: {page.url.split('#', 1)[1]}")
            context.close()

            # 1. The runs view, in a fresh profile.
            context = browser.new_context(viewport=VIEWPORT)
            page = context.new_page()
            page.goto(runs_url)
            group_by = page.get_by_role("button", name="Group by")
            group_by.wait_for(timeout=wait_ms)
            page.wait_for_timeout(3000)
            if "/runs" not in page.url or page.get_by_role("heading", name="Runs").count() == 0:
                raise StepFailed(f"{runs_url} did not open on the Runs page (it shows {page.url})")
            if page.get_by_text("Traces", exact=True).count() and page.get_by_text("Overview", exact=True).count():
                raise StepFailed(f"{runs_url} opened in the GenAI layout, not Model training")
            close_assistant(page)
            page.screenshot(path=str(out / "ui_runs_view.png"))
            print(f"step 1: {runs_url} opened on the runs view -> {out / 'ui_runs_view.png'}")

            # 2. The recipe: filter, Chart view, Group by, scatter chart.
            search = page.locator("input[placeholder*='metrics.rmse']").first
            search.click()
            search.press_sequentially(FID_FILTER, delay=20)  # typed as a user types it; fill() is not applied
            search.press("Enter")
            page.wait_for_timeout(3000)
            snap(page, "1-filtered")
            matching = [line for line in page.locator("body").inner_text().splitlines() if "matching run" in line]
            print(f"filter {FID_FILTER}: {matching[0] if matching else 'no run count shown'}")
            # The Chart view: the second button of the list / chart / artifacts switch left of the search box.
            page.locator("label:has(input[name='runs-view-mode'][value='CHART'])").click()
            page.get_by_role("button", name="Add chart").first.wait_for(timeout=wait_ms)
            page.wait_for_timeout(3000)
            snap(page, "2-chart-view")
            for key in (GROUP_TAG, "pruning_ratio"):
                pick(page, page.get_by_role("button", name="Group by").or_(
                    page.get_by_role("button", name="Group:")).first, key)
                page.keyboard.press("Escape")
                page.wait_for_timeout(1500)
                snap(page, f"3-grouped-by-{key}")
            body = page.locator("body").inner_text()
            missing = [g for g in ARM_GROUPS if f"{GROUP_TAG}: {g}," not in body and f"{GROUP_TAG}: {g}" not in body]
            if missing:
                raise StepFailed(f"after Group by {GROUP_TAG}, pruning_ratio the run list has no group of {missing}")
            # Charts show the first 10 runs (groups) only; the eye menu above the run list shows all.
            page.locator("button[aria-label='Toggle visibility of runs']").first.click()
            page.wait_for_timeout(1000)
            snap(page, "3-eye-menu")
            entries = page.locator("[role=menuitem], [role=menuitemradio], [role=menuitemcheckbox]").all()
            items = [i.inner_text().strip() for i in entries]
            print(f"eye menu above the run list: {items}")
            show_all = [i for i in entries if "show all" in i.inner_text().lower()]
            if not show_all:
                raise StepFailed(f"the eye menu has no 'show all' entry: {items}")
            show_all[0].click()
            page.wait_for_timeout(2000)
            page.get_by_role("button", name="Add chart").first.click()
            page.get_by_role("menuitem", name="Scatter chart").click()
            dialog = page.get_by_role("dialog")
            dialog.wait_for(timeout=wait_ms)
            page.wait_for_timeout(1500)
            x_axis, y_axis = dialog.locator("input[role=combobox]").all()[:2]
            pick_axis(page, x_axis, "pruning_ratio")
            pick_axis(page, y_axis, metric)
            snap(page, "4-scatter-config")
            dialog.get_by_role("button", name="Add chart").click()
            page.wait_for_timeout(4000)
            close_assistant(page)
            title = page.get_by_text(f"pruning_ratio vs. {metric}", exact=True).last
            title.wait_for(timeout=wait_ms)
            title.scroll_into_view_if_needed()
            page.wait_for_timeout(1500)
            page.screenshot(path=str(out / "ui_arms_recipe.png"))
            # The chart alone, full screen: its legend names every group in full.
            card = title.locator("xpath=ancestor::*[.//button[@data-component-id='fullscreen_button_chartcard']][1]")
            card.locator("button[data-component-id='fullscreen_button_chartcard']").click()
            page.wait_for_timeout(4000)
            shown = page.get_by_role("dialog").last.inner_text()
            missing = [g for g in ARM_GROUPS if f"{GROUP_TAG}: {g}," not in shown]
            print("full-screen legend:", sorted({line.strip() for line in shown.splitlines() if GROUP_TAG in line}))
            if missing:
                raise StepFailed(f"the full-screen scatter chart's legend has no group of {missing}")
            page.screenshot(path=str(out / "ui_arms_chart.png"))
            print(f"step 2: grouped by {GROUP_TAG} and pruning_ratio, scatter of {metric} over pruning_ratio "
                  f"-> {out / 'ui_arms_recipe.png'} (the page), {out / 'ui_arms_chart.png'} (the chart, full screen)")
            context.close()
        finally:
            browser.close()


def newest_finetune(experiment_id: str) -> tuple[str, list[str]]:
    """(run ID, its dataset input names) of the experiment's newest FINISHED finetune run that
    logged system metrics (a stage shorter than their sampling interval logs none: docs/stages.md)."""
    from mlflow.tracking import MlflowClient

    runs = MlflowClient().search_runs([experiment_id], FINETUNE_FILTER, order_by=["attributes.start_time DESC"], max_results=200)
    if not runs:
        raise StepFailed(f"experiment {experiment_id} holds no FINISHED finetune run")
    sampled = [r for r in runs if "system/cpu_utilization_percentage" in r.data.metrics]
    if not sampled:
        raise StepFailed(f"none of experiment {experiment_id}'s {len(runs)} newest finetune runs logged system metrics")
    return sampled[0].info.run_id, [i.dataset.name for i in sampled[0].inputs.dataset_inputs]


def run_native(base: str, experiment_id: str, out: Path, wait_ms: int) -> None:
    """Step 3: the Dataset column of the sweep's runs, a finetune run's datasets and system metrics."""
    from playwright.sync_api import sync_playwright

    finetune_id, names = newest_finetune(experiment_id)
    if not names:
        raise StepFailed(f"finetune run {finetune_id} has no dataset inputs")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=BROWSER_ARGS)
        try:
            context = browser.new_context(viewport=VIEWPORT)
            page = context.new_page()
            page.goto(f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning")
            page.get_by_role("button", name="Group by").wait_for(timeout=wait_ms)
            page.wait_for_timeout(3000)
            close_assistant(page)
            # The sweep's stage runs are children of the driver's run, collapsed under it: expand them.
            # (the icon-only button in the run name cell of a parent row; MLflow 3.17 gives it no label)
            page.locator("button[data-component-id*='runnamecellrenderer']").first.wait_for(timeout=wait_ms)
            expanders = [b for b in page.locator("button[data-component-id*='runnamecellrenderer']").all() if b.is_visible()]
            for button in expanders:
                button.click()
                page.wait_for_timeout(1500)
            snap(page, "5-runs-expanded")
            body = page.locator("body").inner_text()
            if "Dataset" not in body:
                raise StepFailed("the runs table shows no Dataset column")
            shown = sorted({n for n in names if n in body})
            if not shown:
                raise StepFailed(f"the runs table's Dataset column names none of the finetune run's inputs {names} "
                                 f"({len(expanders)} parent rows expanded)")
            page.screenshot(path=str(out / "ui_runs_datasets.png"))
            print(f"step 3: runs table, {len(expanders)} parent rows expanded; the Dataset column shows {shown} "
                  f"-> {out / 'ui_runs_datasets.png'}")

            page.goto(f"{base}/#/experiments/{experiment_id}/runs/{finetune_id}?workflowType=machine_learning")
            page.get_by_text(names[0]).first.wait_for(timeout=wait_ms)
            page.wait_for_timeout(3000)
            close_assistant(page)
            # The Datasets field shows the first input and "+N": open the rest.
            more = page.get_by_text(re.compile(r"^\+\d+$"))
            if more.count():
                more.first.click()
                page.wait_for_timeout(2000)
            snap(page, "6-finetune-run")
            body = page.locator("body").inner_text()
            missing = [n for n in names if n not in body]
            if missing:
                raise StepFailed(f"the finetune run's page does not list its datasets {missing}")
            page.screenshot(path=str(out / "ui_finetune_run.png"), full_page=True)
            print(f"step 3: finetune run {finetune_id}'s page lists {names} -> {out / 'ui_finetune_run.png'}")
            tab = page.get_by_role("tab", name="System metrics")
            if tab.count() == 0:
                tab = page.get_by_text("System metrics", exact=True)
            tab.first.click()
            page.get_by_text("cpu_utilization_percentage").first.wait_for(timeout=wait_ms)
            page.locator(".js-plotly-plot").first.wait_for(timeout=wait_ms)  # the charts drawn, not their spinners
            page.wait_for_timeout(3000)
            page.screenshot(path=str(out / "ui_finetune_system_metrics.png"))
            print(f"step 3: its System metrics tab -> {out / 'ui_finetune_system_metrics.png'}")
            # The preview grids logged with mlflow.log_image(key="preview", step=...): Model metrics tab.
            page.get_by_role("tab", name="Model metrics").or_(page.get_by_text("Model metrics", exact=True)).first.click()
            page.wait_for_timeout(8000)
            snap(page, "7-model-metrics")
            if "preview" not in page.locator("body").inner_text():
                raise StepFailed("the finetune run's Model metrics tab shows no 'preview' images")
            # In the card MLflow 3.17 draws the grid at the foot of a box taller than the card (it
            # shows grey): open the card's full-screen view, in a window tall enough to hold it.
            card = page.get_by_text("preview", exact=True).first.locator("xpath=ancestor::div[3]")
            page.set_viewport_size({"width": 1400, "height": 1500})
            card.scroll_into_view_if_needed()
            [b for b in card.locator("button").all() if b.is_visible()][0].click()  # its expand icon
            try:
                page.wait_for_function(
                    "Array.from(document.images).some(i => i.src.includes('preview') && i.complete && i.naturalWidth > 0)",
                    timeout=wait_ms)
            except Exception:
                raise StepFailed("the finetune run's 'preview' image card never loaded its picture") from None
            page.wait_for_timeout(2000)
            page.screenshot(path=str(out / "ui_finetune_previews.png"))
            print(f"step 3: its Model metrics tab shows the 'preview' grids with a step slider -> {out / 'ui_finetune_previews.png'}")
            context.close()
        finally:
            browser.close()


def main() -> int:
    global DEBUG_DIR, NATIVE_ONLY
    args = parse_args()
    store = Path(args.store).resolve()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    DEBUG_DIR = out if args.debug else None
    NATIVE_ONLY = args.native
    if not shutil.which("chromium"):
        print("ui_screenshot: error: no chromium on PATH (apt-get install -y chromium)", file=sys.stderr)
        return 1
    try:
        if args.build:
            build_store(store)
        elif not (store / "mlflow.db").is_file():
            raise StepFailed(f"no mlflow.db in {store}: pass --build to make a demo store there")
        experiment_id, name = find_experiment(store, args.experiment)
        port = args.port or free_port()
        server = start_ui(store, port, args.wait)
        try:
            print(f"mlflow ui --backend-store-uri {store_uri(store)} on port {port}; experiment '{name}' (id {experiment_id})")
            if not args.native:
                run_recipe(f"http://127.0.0.1:{port}", experiment_id, args.metric, out, int(args.wait * 1000))
            run_native(f"http://127.0.0.1:{port}", experiment_id, out, int(args.wait * 1000))
        finally:
            stop(server)
    except (StepFailed, subprocess.CalledProcessError) as exc:
        print(f"ui_screenshot: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a page element that never came (playwright's TimeoutError and kin)
        if type(exc).__module__.startswith("playwright"):
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            print(f"ui_screenshot: error: the browser step failed: {first} (rerun with --debug for screenshots)",
                  file=sys.stderr)
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
