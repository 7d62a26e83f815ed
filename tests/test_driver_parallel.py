"""The driver's scheduler: independent steps of the sweep at once, each on a GPU of its own.

- the scheduler with a stand-in stage runner (no processes): needs respected, never more than
  ``parallel`` at once, no slot (GPU) held by two running steps, failures, ``parallel`` 1 = the
  plan in order;
- the options (``parallel``, ``gpus``, ``threads``, ``backend``, ``backend_config``);
- a cluster backend: what reaches ``mlflow.projects.run`` (monkeypatched) and the tags on its run;
  MLflow's own kubernetes backend without a cluster: a pending pod's run keeps no driver process and
  a driver rerun waits for it;
- the real local backend on a stand-in project whose stages record their environment: the GPU and
  thread variables each stage process saw, and lineage and the cache under ``parallel`` 2;
- end to end (``e2e``): tests/test_driver.py runs the tiny sweep with ``--parallel 2`` beside its
  sequential sweep (one store) and compares the tables.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest

from maskdm import driver
from maskdm.errors import MaskDMError
from test_driver import (  # noqa: F401 - fixtures and helpers of the driver's tests
    FAKE_STAGES,
    stand_in_project,
    fake_project,
    parent,
)

# --- the scheduler with a stand-in runner ----------------------------------------------------------


def _demo_plan(mask_training: str = "both", ratios: str = "0.3,0.5,0.7"):
    return driver.build_plan(driver.resolve_config("demo", ratios=ratios, mask_training=mask_training))


class Recorder:
    """A stand-in for starting a stage: sleeps a little, records when each step ran and in which slot."""

    def __init__(self, fail: str | None = None, delay: float = 0.01):
        self.lock = threading.Lock()
        self.events: list[tuple[str, str, int]] = []  # ("start"|"end", step, slot)
        self.running: dict[str, int] = {}
        self.most = 0
        self.fail = fail
        self.delay = delay
        self.threads: set[str] = set()

    def __call__(self, step, slot, done):
        with self.lock:
            # Everything the step needs has ended, and its outcome is there to read.
            for needed in step.needs.values():
                assert needed in done and ("end", needed) in {(e[0], e[1]) for e in self.events}, (step.name, needed)
            assert slot not in self.running.values(), (step.name, slot, self.running)
            self.running[step.name] = slot
            self.most = max(self.most, len(self.running))
            self.events.append(("start", step.name, slot))
            self.threads.add(threading.current_thread().name)
        # The failing step ends while the others started beside it still run; the rest take varied times.
        time.sleep(self.delay if step.name == self.fail else self.delay * (4 + len(step.name) % 3))
        with self.lock:
            del self.running[step.name]
            self.events.append(("end", step.name, slot))
        if step.name == self.fail:
            raise MaskDMError(f"stage {step.stage} failed in run x ({step.name}); its error is printed above")
        return driver.StageOutcome(step.name, step.stage, f"run-of-{step.name}", reused=False)


def test_parallel_one_runs_the_plan_in_order_in_this_thread():
    plan = _demo_plan()
    recorder = Recorder(delay=0)
    seen = []
    outcomes = driver.schedule(plan, recorder, parallel=1, on_outcome=lambda o: seen.append(o.step))
    assert [e[1] for e in recorder.events if e[0] == "start"] == [s.name for s in plan]
    assert recorder.most == 1 and recorder.threads == {threading.current_thread().name}
    assert seen == list(outcomes) == [s.name for s in plan]


@pytest.mark.parametrize("parallel", [2, 3, 8])
def test_steps_start_once_their_needs_end_and_never_more_than_parallel(parallel):
    plan = _demo_plan()
    recorder = Recorder()
    seen = []
    main_thread = threading.current_thread()
    outcomes = driver.schedule(plan, recorder, parallel=parallel,
                               on_outcome=lambda o: seen.append((o.step, threading.current_thread() is main_thread)))
    # Needs and distinct slots are asserted inside the recorder, as each step starts.
    assert recorder.most == parallel  # not vacuous: the sweep has that many independent branches
    assert all(slot < parallel for _, _, slot in recorder.events)
    assert list(outcomes) == [s.name for s in plan]  # keyed in plan order, as the sequential driver
    assert all(o.run_id == f"run-of-{name}" for name, o in outcomes.items())
    assert sorted(name for name, _ in seen) == sorted(s.name for s in plan) and all(main for _, main in seen)
    assert plan[0].name == driver.DEMO_MODEL_STEP
    starts = [e[1] for e in recorder.events if e[0] == "start"]
    assert starts[0] == driver.DEMO_MODEL_STEP
    # The demo model runs alone: every other step needs it, directly or not.
    first_end = recorder.events.index(("end", driver.DEMO_MODEL_STEP, 0))
    assert [e for e in recorder.events[:first_end] if e[0] == "start"] == [("start", driver.DEMO_MODEL_STEP, 0)]


def test_a_failure_starts_nothing_new_waits_for_the_running_and_raises_its_error():
    plan = _demo_plan(mask_training="both", ratios="0.5")
    # The pruned model's sample fails while other branches of the ratio run beside it.
    failing = "sample r=0.5 (pruned)"
    recorder = Recorder(fail=failing, delay=0.05)
    seen = []
    with pytest.raises(MaskDMError, match=r"^stage sample failed in run x \(sample r=0\.5 \(pruned\)\)"):
        driver.schedule(plan, recorder, parallel=3, on_outcome=lambda o: seen.append(o.step))
    failed_at = recorder.events.index(("end", failing, next(e[2] for e in recorder.events if e[1] == failing)))
    started_after = [e[1] for e in recorder.events[failed_at:] if e[0] == "start"]
    ended_after = [e[1] for e in recorder.events[failed_at + 1:] if e[0] == "end"]
    assert started_after == []
    assert ended_after, "no step was running beside the failing one: the test would not show the wait"
    # The steps running at the failure finished and were recorded; the failed one and its fid were not.
    assert set(ended_after) <= set(seen)
    assert failing not in seen and "fid r=0.5 (pruned)" not in [e[1] for e in recorder.events]
    assert not recorder.running


def test_a_plan_whose_step_needs_a_later_or_missing_step_is_refused():
    plan = _demo_plan(ratios="0.5")
    swapped = [plan[1], plan[0], *plan[2:]]
    with pytest.raises(MaskDMError, match="needs pretrain demo, which no earlier step is"):
        driver.schedule(swapped, Recorder(), parallel=2)


# --- GPU slots and threads through run_plan --------------------------------------------------------


def test_each_running_stage_gets_a_gpu_no_other_running_stage_has(monkeypatch):
    plan = _demo_plan()
    lock = threading.Lock()
    holding: dict[str, str] = {}
    record = {"most": 0, "gpus": set(), "concurrent": set(), "threads": set()}

    def fake_run_stage(stage, params, *, step, env, concurrent, launch, **kwargs):
        gpu = env["CUDA_VISIBLE_DEVICES"]
        with lock:
            assert gpu not in holding.values(), (step, gpu, holding)
            holding[step] = gpu
            record["most"] = max(record["most"], len(holding))
            record["gpus"].add(gpu)
            record["concurrent"].add(concurrent)
            record["threads"].add(env["OMP_NUM_THREADS"])
        time.sleep(0.005 * (1 + hash(step) % 4))
        with lock:
            del holding[step]
        return driver.StageOutcome(step, stage, f"run-of-{step}", reused=False)

    monkeypatch.setattr(driver.sweep, "run_stage", fake_run_stage)
    monkeypatch.setattr(driver.sweep, "find_demo_model", lambda *a: None)
    monkeypatch.setattr("maskdm.tracking.code_version", lambda *a: "v1")
    launch = driver.resolve_launch(parallel="auto", gpus="2,5,7", cores=16)
    assert launch.parallel == 3 and launch.threads == 5
    outcomes = driver.run_plan(plan, experiment_id="0", parent_run_id="p", launch=launch)
    assert len(outcomes) == len(plan)
    assert record["most"] == 3 and record["gpus"] == {"2", "5", "7"}
    assert record["concurrent"] == {True} and record["threads"] == {"5"}


def test_the_default_launch_is_the_sequential_driver_unchanged(monkeypatch):
    calls = []

    def fake_run_stage(stage, params, *, step, env, concurrent, launch, **kwargs):
        calls.append((step, dict(env), concurrent, launch, threading.current_thread().name))
        return driver.StageOutcome(step, stage, f"run-of-{step}", reused=False)

    monkeypatch.setattr(driver.sweep, "run_stage", fake_run_stage)
    monkeypatch.setattr(driver.sweep, "find_demo_model", lambda *a: None)
    monkeypatch.setattr("maskdm.tracking.code_version", lambda *a: "v1")
    # On a machine without GPUs, auto is one stage at a time with the environment untouched ...
    launch = driver.resolve_launch(detect_gpus=lambda: ())
    assert launch == driver.Launch()
    # ... and so it is on a GPU machine when parallel is 1 (the stage sees what the driver sees).
    assert driver.resolve_launch(parallel=1, detect_gpus=lambda: ("0", "1")) == driver.Launch()
    plan = _demo_plan(ratios="0.5")
    driver.run_plan(plan, experiment_id="0", parent_run_id="p", launch=launch)
    assert [c[0] for c in calls] == [s.name for s in plan]
    assert all(c[1:4] == ({}, False, None) and c[4] == threading.current_thread().name for c in calls)


# --- the options -----------------------------------------------------------------------------------


def test_auto_uses_every_visible_gpu_and_shares_the_cores_on_a_cpu():
    four = lambda: ("0", "1", "2", "3")  # noqa: E731
    launch = driver.resolve_launch(detect_gpus=four, cores=32)
    assert (launch.parallel, launch.gpus, launch.threads) == (4, ("0", "1", "2", "3"), 8)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in launch.slot_envs()] == ["0", "1", "2", "3"]
    two = driver.resolve_launch(parallel=2, detect_gpus=four, cores=32)
    assert two.gpus == ("0", "1", "2", "3") and len(two.slot_envs()) == 2
    cpu = driver.resolve_launch(parallel=2, detect_gpus=lambda: (), cores=2)
    assert (cpu.parallel, cpu.gpus, cpu.threads) == (2, None, 1)
    assert cpu.slot_envs() == [{"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}] * 2
    hidden = driver.resolve_launch(parallel=3, gpus="none", detect_gpus=four, cores=7)
    assert hidden.gpus == () and hidden.threads == 2
    assert {e["CUDA_VISIBLE_DEVICES"] for e in hidden.slot_envs()} == {""}
    pinned = driver.resolve_launch(parallel=1, gpus="3", threads=4, detect_gpus=four)
    assert pinned.slot_envs() == [{"CUDA_VISIBLE_DEVICES": "3", "OMP_NUM_THREADS": "4", "MKL_NUM_THREADS": "4"}]


def test_without_gpu_device_files_no_gpu_is_found_and_torch_is_not_asked(monkeypatch):
    """On Linux without NVIDIA's, ROCm's or WSL2's device files the driver finds no GPU without
    importing torch (blocked here, so asking it would fail); with one of them it asks torch."""
    import torch

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    present: set[str] = set()
    monkeypatch.setattr(driver.launch.os.path, "exists", lambda path: path in present)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    assert driver.visible_gpus() == ()
    present.add("/dev/nvidiactl")
    with pytest.raises(ImportError):
        driver.visible_gpus()
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert driver.visible_gpus() == ("0", "1", "2")


def test_visible_gpus_follow_the_drivers_own_mask(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert driver.visible_gpus() == ("2", "3")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,-1,2")
    assert driver.visible_gpus() == ("1",)  # CUDA stops at an invalid entry
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert driver.visible_gpus() == ()


@pytest.mark.parametrize("options, message", [
    (dict(parallel="0"), "parallel must be an integer >= 1 or auto, not '0'"),
    (dict(parallel="two"), "parallel must be an integer"),
    (dict(threads="-1"), "threads must be an integer"),
    (dict(gpus="0,0"), "names a GPU twice"),
    (dict(gpus="cuda:0"), "'cuda:0' is not a GPU index"),
    (dict(parallel="3", gpus="0,1"), "parallel 3 needs 3 GPUs"),
    (dict(backend="slurmish"), "backend 'slurmish' is not one of local, kubernetes, databricks"),
    (dict(backend_config='{"a": 1}'), "backend_config is for a cluster backend"),
    (dict(backend="kubernetes"), "needs kube-job-template-path, repository-uri"),
    (dict(backend="kubernetes", backend_config='{"repository-uri": "r", "kube-job-template-path": "/no/such.yaml"}'),
     "is not a file"),
    (dict(backend="kubernetes", backend_config="/no/such/config.json"), "neither a JSON file that exists"),
    (dict(backend="kubernetes", backend_config="{not json"), "not valid JSON"),
    (dict(backend="kubernetes", backend_config="/tmp"), "neither a JSON file"),
    (dict(backend="databricks", backend_config='["x"]'), "must be a JSON object"),
    (dict(backend="kubernetes", gpus="0"), "gpus and threads apply to the local backend"),
])
def test_bad_launch_options_are_one_line_errors(options, message):
    with pytest.raises(MaskDMError, match=message.replace("(", r"\(").replace(")", r"\)")) as raised:
        driver.resolve_launch(**options, detect_gpus=lambda: ())
    assert "\n" not in str(raised.value)


def test_main_refuses_bad_launch_options_before_anything_runs(tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    done = subprocess.run([sys.executable, "-m", "entrypoints.cli", "main", "--parallel", "0"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == (
        "maskdm: error: parallel must be an integer >= 1 or auto, not '0'; it is how many stages run at once")
    assert not (tmp_path / "mlflow.db").exists()  # no run was made


# --- a cluster backend (mlflow.projects.run monkeypatched) ------------------------------------------


class FakeSubmitted:
    def __init__(self, run_id: str, ok: bool):
        self.run_id, self.ok = run_id, ok

    def wait(self):
        return self.ok

    def cancel(self):
        pass


@pytest.mark.parametrize("ok", [True, False])
def test_a_cluster_backend_gets_its_config_and_its_run_gets_the_drivers_tags(fake_project, parent, tmp_path, monkeypatch, ok):
    import mlflow
    from mlflow.tracking import MlflowClient

    template = tmp_path / "job.yaml"
    template.write_text("apiVersion: batch/v1\nkind: Job\n")
    config = {"kube-context": "cluster", "repository-uri": "registry.example/maskdm", "kube-job-template-path": str(template)}
    (tmp_path / "k8s.json").write_text(json.dumps(config))
    launch = driver.resolve_launch(parallel=4, backend="kubernetes", backend_config=str(tmp_path / "k8s.json"))
    assert (launch.parallel, launch.gpus, launch.threads, launch.backend_config) == (4, None, None, config)

    client = MlflowClient()
    calls = []

    def fake_projects_run(**kwargs):
        # What the kubernetes backend does: it makes the run itself, logging the parameters.
        calls.append(kwargs)
        run = client.create_run(kwargs["experiment_id"])
        for key, value in kwargs["parameters"].items():
            client.log_param(run.info.run_id, key, value)
        return FakeSubmitted(run.info.run_id, ok)

    monkeypatch.setattr(mlflow.projects, "run", fake_projects_run)
    kwargs = dict(experiment_id="0", parent_run_id=parent.info.run_id, project_dir=fake_project, code_version="v1",
                  step="prune r=0.5", tags={driver.VARIANT_TAG: "pruned"}, launch=launch)
    if ok:
        outcome = driver.run_stage("prune", {"pruning_ratio": "0.5"}, **kwargs)
    else:
        with pytest.raises(MaskDMError, match="stage prune failed in run .* on backend kubernetes"):
            driver.run_stage("prune", {"pruning_ratio": "0.5"}, **kwargs)
    [call] = calls
    assert call["backend"] == "kubernetes" and call["backend_config"] == config and call["synchronous"] is False
    assert call["entry_point"] == "prune" and call["uri"] == str(fake_project) and "run_id" not in call
    [run] = client.search_runs(["0"], "tags.`maskdm.stage` = 'prune'")
    tags = run.data.tags
    assert tags[driver.CACHE_KEY_TAG] == driver.cache_key("prune", {"pruning_ratio": "0.5", "seed": "0"}, "v1")
    assert tags[driver.PARENT_RUN_TAG] == parent.info.run_id and tags[driver.STEP_TAG] == "prune r=0.5"
    assert tags[driver.VARIANT_TAG] == "pruned"
    assert run.info.status == ("FINISHED" if ok else "FAILED")
    if ok:
        assert outcome.run_id == run.info.run_id and not outcome.reused
        # The cache works as on the local backend: the same stage again is the same run.
        again = driver.run_stage("prune", {"pruning_ratio": "0.5"}, **kwargs)
        assert again.reused and again.run_id == run.info.run_id and len(calls) == 1


class FakeBatchApi:
    """The Kubernetes BatchV1Api calls MLflow's kubernetes backend makes: a Job is created and stays
    pending (no start time) until the test completes it."""

    jobs: dict[str, dict] = {}
    complete: set[str] = set()

    def create_namespaced_job(self, namespace, body, pretty=True):
        FakeBatchApi.jobs[f"{namespace}/{body['metadata']['name']}"] = body

    def read_namespaced_job_status(self, name, namespace, pretty=True):
        from types import SimpleNamespace

        done = f"{namespace}/{name}" in FakeBatchApi.complete
        conditions = [SimpleNamespace(status="True", type="Complete", message="done")] if done else None
        return SimpleNamespace(status=SimpleNamespace(start_time="now" if done else None, conditions=conditions))

    def delete_namespaced_job(self, **kwargs):
        pass


@pytest.fixture
def kubernetes_without_a_cluster(monkeypatch):
    """MLflow's own kubernetes backend (mlflow.projects.run's project, parameter, docker_env and
    backend_config checks, its Job definition from the template, KubernetesSubmittedRun's polling),
    with only what needs a cluster or a docker daemon replaced: the ``kubernetes`` client package
    (not installed here) by :class:`FakeBatchApi`, and the image build and push."""
    import sys
    import types

    fake = types.ModuleType("kubernetes")
    fake.config = types.ModuleType("kubernetes.config")
    fake.config.load_kube_config = lambda context=None: None
    fake.config.load_incluster_config = lambda: None
    fake.config.config_exception = types.ModuleType("kubernetes.config.config_exception")
    fake.config.config_exception.ConfigException = type("ConfigException", (Exception,), {})
    fake.client = types.SimpleNamespace(BatchV1Api=FakeBatchApi, V1DeleteOptions=dict)
    for name, module in {"kubernetes": fake, "kubernetes.config": fake.config,
                         "kubernetes.config.config_exception": fake.config.config_exception}.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delitem(sys.modules, "mlflow.projects.kubernetes", raising=False)
    import mlflow.projects.docker as mlflow_docker
    import mlflow.projects.kubernetes as kb

    monkeypatch.setattr(mlflow_docker, "validate_docker_installation", lambda: None)
    monkeypatch.setattr(mlflow_docker, "build_docker_image",
                        lambda **kwargs: types.SimpleNamespace(tags=[f"{kwargs['repository_uri']}:{kwargs['run_id'][:7]}"]))
    monkeypatch.setattr(kb, "push_image_to_registry", lambda tag: "sha256:" + "0" * 64)
    monkeypatch.setattr(kb.KubernetesSubmittedRun, "POLL_STATUS_INTERVAL", 0.05)
    monkeypatch.setattr(driver.launch, "REMOTE_POLL_S", 0.05)
    FakeBatchApi.jobs, FakeBatchApi.complete = {}, set()
    return FakeBatchApi


def test_a_pending_pod_keeps_its_run_and_a_driver_rerun_waits_for_it(fake_project, parent, tmp_path, kubernetes_without_a_cluster,
                                                                    monkeypatch):
    """A pod still pending when its driver dies: its run records what was launched (backend, job),
    not the driver's process, so a rerun of the driver on the same host does not end it as dead,
    and waits for it rather than start the stage twice."""
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    from maskdm import liveness

    # MLflow's kubernetes backend runs only projects with a docker_env; a copy of the stand-in with one.
    mlproject = (fake_project / "MLproject").read_text()
    (fake_project / "MLproject").write_text(mlproject + "docker_env:\n  image: registry.example/maskdm-base:1\n")
    template = tmp_path / "job.yaml"
    template.write_text(
        "apiVersion: batch/v1\nkind: Job\nmetadata: {name: x, namespace: mlflow}\n"
        "spec:\n  template:\n    spec:\n      containers: [{name: x, image: x}]\n      restartPolicy: Never\n"
    )
    config = {"repository-uri": "registry.example/maskdm", "kube-job-template-path": str(template)}
    launch = driver.resolve_launch(parallel=1, backend="kubernetes", backend_config=json.dumps(config))
    client = MlflowClient()
    kwargs = dict(experiment_id="0", parent_run_id=parent.info.run_id, project_dir=fake_project, code_version="v1",
                  step="prune r=0.5", launch=launch)

    # The drivers here record a process that has ended (as a SIGKILLed driver's): a run carrying
    # the driver's process would be judged dead by the rerun, ended KILLED and launched again.
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead_driver = liveness.process_tags(sleeper.pid)
    sleeper.kill()
    sleeper.wait()
    assert liveness.judge(dead_driver, time.time()).dead
    monkeypatch.setattr(liveness, "process_tags", lambda pid=None: dict(dead_driver))

    first = threading.Thread(target=lambda: driver.run_stage("prune", {"pruning_ratio": "0.5"}, **kwargs), daemon=True)
    first.start()
    deadline = time.monotonic() + 60
    while not (runs := client.search_runs(["0"], f"tags.`{driver.LAUNCHED_ON_TAG}` = 'kubernetes'")) and time.monotonic() < deadline:
        time.sleep(0.05)
    [pending] = runs
    [job] = kubernetes_without_a_cluster.jobs
    tags = pending.data.tags
    # MLflow built the Job from the template, with the project's command and the run's ID.
    body = kubernetes_without_a_cluster.jobs[job]
    container = body["spec"]["template"]["spec"]["containers"][0]
    assert container["name"] == "fake" and container["image"].startswith("registry.example/maskdm:")
    assert any(e["name"] == "MLFLOW_RUN_ID" and e["value"] == pending.info.run_id for e in container["env"])
    assert tags[driver.BACKEND_JOB_TAG] == job and tags["mlflow.project.backend"] == "kubernetes"
    assert tags[driver.CACHE_KEY_TAG] and tags[driver.PARENT_RUN_TAG] == parent.info.run_id
    # What was launched, never the driver's own process.
    assert not set(liveness.PROCESS_TAGS) & set(tags), tags

    # The first driver is "dead" (its thread stays blocked on the pending pod); a rerun on this
    # host must neither end the pod's run nor launch the stage again.
    rerun: dict = {}
    second = threading.Thread(target=lambda: rerun.update(outcome=driver.run_stage("prune", {"pruning_ratio": "0.5"}, **kwargs)),
                              daemon=True)
    second.start()
    time.sleep(1.0)
    assert second.is_alive() and "outcome" not in rerun
    assert client.get_run(pending.info.run_id).info.status == "RUNNING"
    assert liveness.ENDED_BY_TAG not in client.get_run(pending.info.run_id).data.tags
    assert len(kubernetes_without_a_cluster.jobs) == 1  # no second Job

    # The pod runs and finishes (its stage ends its run FINISHED); both drivers take that run.
    client.set_terminated(pending.info.run_id, "FINISHED")
    kubernetes_without_a_cluster.complete.add(job)
    second.join(30)
    first.join(30)
    assert rerun["outcome"].run_id == pending.info.run_id and rerun["outcome"].reused
    assert len(kubernetes_without_a_cluster.jobs) == 1
    assert len(client.search_runs(["0"], "tags.`maskdm.stage` = 'prune'")) == 1


# --- the real local backend, stages that record their environment -----------------------------------

# The stand-in stages of test_driver: (declared params with defaults, upstream param).
STAGES = FAKE_STAGES


@pytest.fixture
def env_project(tmp_path):
    """An MLproject whose stages write the GPU and thread variables they see, and when they ran,
    to $ENV_LOG/<run id> (and its process ID), then sleeps FAKE_SLEEP seconds (0.5); the stage named by FAKE_FAIL exits 3. (The closing ``true`` takes the
    undeclared parameters MLflow appends.)"""
    record = ('echo $$ > $ENV_LOG/$MLFLOW_RUN_ID.pid; '
              'echo $(date +%s.%N) ${{CUDA_VISIBLE_DEVICES-unset}} ${{OMP_NUM_THREADS-unset}} > $ENV_LOG/$MLFLOW_RUN_ID.start; '
              # Wait (up to 10 s) until two stages have started: a driver running two at once always
              # overlaps them, however slowly the machine starts processes; a sequential one never does.
              'for i in $(seq 50); do [ $(ls $ENV_LOG/*.start | wc -l) -ge 2 ] && break; sleep 0.2; done; '
              'sleep ${{FAKE_SLEEP-0.5}}; test \\"$FAKE_FAIL\\" != {stage} || exit 3; date +%s.%N > $ENV_LOG/$MLFLOW_RUN_ID.end; true')
    folder = stand_in_project(tmp_path / "env_project", "envs", lambda stage: record.replace("{stage}", stage))
    (tmp_path / "envlog").mkdir()
    return folder


def _seen(log_dir: Path) -> dict[str, tuple[float, float | None, str, str]]:
    found = {}
    for start in sorted(log_dir.glob("*.start")):
        t0, gpu, threads = start.read_text().split()
        end = start.with_suffix(".end")
        found[start.stem] = (float(t0), float(end.read_text()) if end.exists() else None, gpu, threads)
    return found


def test_two_stage_processes_at_once_each_see_their_own_gpu_and_threads(env_project, parent, tmp_path, monkeypatch, tiny_model_dir):
    """Through mlflow's local backend: the environment edits reach each stage process and no other,
    the lineage is wired as in the sequential driver, and a rerun reuses every stage."""
    from mlflow.tracking import MlflowClient

    log_dir = tmp_path / "envlog"
    monkeypatch.setenv("ENV_LOG", str(log_dir))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr("maskdm.tracking.code_version", lambda *a: "v1")  # others may edit the tree meanwhile
    before = dict(os.environ)
    full = driver.build_plan(driver.resolve_config("demo", model=str(tiny_model_dir), ratios="0.4", mask_training="false"))
    # Two independent chains of two (each stage process costs seconds on a busy machine).
    plan = [s for s in full if s.name in ("prune dense", "sample dense", "prune r=0.4", "sample r=0.4 (pruned)")]
    assert len(plan) == 4
    launch = driver.resolve_launch(parallel=2, gpus="4,6", threads=3)
    run = dict(experiment_id="0", parent_run_id=parent.info.run_id, project_dir=env_project)
    outcomes = driver.run_plan(plan, **run, launch=launch)
    assert dict(os.environ) == before  # the driver's own environment is as it was

    seen = _seen(log_dir)
    assert set(seen) == {o.run_id for o in outcomes.values()}
    assert {gpu for _, _, gpu, _ in seen.values()} == {"4", "6"} and {t for *_, t in seen.values()} == {"3"}
    spans = sorted(seen.values())
    overlapping = [(a, b) for i, a in enumerate(spans) for b in spans[i + 1:] if b[0] < a[1]]
    assert overlapping, "no two stages ran at once"
    assert all(a[2] != b[2] for a, b in overlapping), overlapping  # never one GPU for two at once

    client = MlflowClient()
    for step in plan:
        got = client.get_run(outcomes[step.name].run_id)
        assert got.info.status == "FINISHED" and got.data.tags["maskdm.stage"] == step.stage
        assert got.data.tags[driver.PARENT_RUN_TAG] == parent.info.run_id
        for param, needed in step.needs.items():
            assert got.data.params[param] == outcomes[needed].run_id
    assert all(o.cpu_s > 0 and o.wall_s >= 0.5 for o in outcomes.values())  # each its own process tree

    again = driver.run_plan(plan, **run, launch=launch)
    assert all(o.reused for o in again.values())
    assert {k: o.run_id for k, o in again.items()} == {k: o.run_id for k, o in outcomes.items()}


def test_a_failing_stage_under_parallel_is_failed_and_the_driver_raises(env_project, parent, tmp_path, monkeypatch, tiny_model_dir):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("ENV_LOG", str(tmp_path / "envlog"))
    monkeypatch.setenv("FAKE_FAIL", "extract_masks")
    full = driver.build_plan(driver.resolve_config("demo", model=str(tiny_model_dir), ratios="0.4", mask_training="false"))
    # extract_masks fails while the dense sample runs beside it; the finetune needs it.
    keep = ("prune dense", "sample dense", "prune r=0.4", "extract_masks r=0.4", "finetune r=0.4 (from pruned)")
    plan = [s for s in full if s.name in keep]
    assert len(plan) == len(keep)
    done = []
    with pytest.raises(MaskDMError, match=r"^stage extract_masks failed in run [0-9a-f]{32} \(extract_masks r=0.4\)"):
        driver.run_plan(plan, experiment_id="0", parent_run_id=parent.info.run_id, project_dir=env_project,
                        launch=driver.resolve_launch(parallel=2), on_outcome=lambda o: done.append(o.step))
    client = MlflowClient()
    [failed] = client.search_runs(["0"], "tags.`maskdm.stage` = 'extract_masks'")
    assert failed.info.status == "FAILED"
    # Nothing that needs it ran; what ran is FINISHED and was reported.
    assert not client.search_runs(["0"], "tags.`maskdm.stage` = 'finetune'")
    finished = client.search_runs(["0"], "attributes.status = 'FINISHED' and tags.`maskdm.stage` != ''")
    assert {r.data.tags[driver.STEP_TAG] for r in finished if driver.STEP_TAG in r.data.tags} == set(done)
    assert "prune r=0.4" in done


def test_an_interrupted_parallel_driver_stops_its_running_stages_and_fails_their_runs(env_project, parent, tmp_path, monkeypatch,
                                                                                    tiny_model_dir):
    """Ctrl-C (or the SIGTERM that `maskdm main` turns into one) while two stages run at once: both
    stage processes are stopped, both runs end FAILED (none left RUNNING), nothing more starts, and
    the interrupt reaches the caller."""
    import contextlib
    import signal

    import psutil
    from mlflow.tracking import MlflowClient

    log_dir = tmp_path / "envlog"
    monkeypatch.setenv("ENV_LOG", str(log_dir))
    monkeypatch.setenv("FAKE_SLEEP", "120")  # until stopped
    full = driver.build_plan(driver.resolve_config("demo", model=str(tiny_model_dir), ratios="0.4", mask_training="false"))
    plan = [s for s in full if s.name in ("prune dense", "sample dense", "prune r=0.4", "sample r=0.4 (pruned)")]

    def interrupt_once_two_run() -> None:
        deadline = time.monotonic() + 120
        while len(list(log_dir.glob("*.start"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    watcher = threading.Thread(target=interrupt_once_two_run, daemon=True)
    started = time.monotonic()
    try:
        watcher.start()
        with pytest.raises(KeyboardInterrupt):
            driver.run_plan(plan, experiment_id="0", parent_run_id=parent.info.run_id, project_dir=env_project,
                            launch=driver.resolve_launch(parallel=2))
    finally:
        signal.signal(signal.SIGINT, previous)
        watcher.join(5)
    assert time.monotonic() - started < 100  # stopped, not slept out

    runs = MlflowClient().search_runs(["0"], "tags.`maskdm.stage` != ''")
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FAILED"}, [(r.data.tags[driver.STEP_TAG], r.info.status) for r in runs]
    pids = [int(p.read_text()) for p in log_dir.glob("*.pid")]
    assert len(pids) == 2
    running = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):  # gone already, between the listing and here
            running.append(psutil.Process(pid))
    _, alive = psutil.wait_procs(running, timeout=30)
    assert all(p.status() == psutil.STATUS_ZOMBIE for p in alive), alive
    assert not list(log_dir.glob("*.end"))
