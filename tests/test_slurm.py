"""A tiny sweep through a real SLURM cluster (`make test` starts a one-node one with
scripts/slurm_local.sh): every array task trains, evaluates and leaves its run folder."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from id2face.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def slurm_ready() -> str | None:
    """None if a SLURM node is idle here, else the reason it is not."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "SLURM is not installed (make test runs scripts/slurm_local.sh start, which needs root + apt)"
    try:
        states = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"sinfo failed: {err}"
    if not any(s in states for s in ("idle", "mix")):
        return f"no idle SLURM node (sinfo: {states.strip() or 'no answer'}); start one with scripts/slurm_local.sh start"
    return None


@pytest.mark.slow
def test_sweep_runs_as_a_slurm_array_and_every_task_leaves_metrics(tmp_path):
    reason = slurm_ready()
    if reason:
        pytest.skip(reason)
    sweep = tmp_path / "tiny.sweep.yaml"
    sweep.write_text(f"""
base: [tiny]
ablations:
  base: []
  harmonizer_sum: [{REPO}/ablations/harmonizer_sum.yaml]
seeds: [0]
overrides:
  - run.root={tmp_path}/runs
  - trainer.max_steps=2
  - data.batch_size=2
  - data.dataset.params.num_identities=40
  - data.dataset.params.samples_per_identity=4
  - trainer.limit_val_batches=0
  - eval.limit=8
  - eval.diversity_k=2
  - "eval.recognizers=[{{name: encoder, params: {{encoder: {{name: tiny}}}}}}]"
resources: {{gpus_per_node: 0, cpus_per_task: 1, mem_gb: 4, timeout_min: 20}}
""")
    out = subprocess.run([sys.executable, "-m", "id2face.cli", "sweep", str(sweep), "--launcher", "slurm", "--wait",
                          "--folder", str(tmp_path / "slurm")], cwd=tmp_path, capture_output=True, text=True,
                         timeout=900)
    logs = "\n".join(p.read_text()[-1500:] for p in sorted((tmp_path / "slurm").rglob("*.err")))
    assert out.returncode == 0, out.stderr[-3000:] + logs
    assert "submitted array job" in out.stderr
    for ablation in ("base", "harmonizer_sum"):
        folder = tmp_path / "runs" / "tiny" / ablation / "seed0"
        assert (folder / "config.yaml").is_file() and (folder / "checkpoints" / "last.ckpt").is_file()
        assert json.loads((folder / "train_state.json").read_text())["global_step"] == 2
        metrics = json.loads((folder / "metrics.json").read_text())["metrics"]
        assert 0.0 <= metrics["tiny/top1"] <= 1.0 and "pose" in metrics
    # the array really ran under SLURM: its tasks wrote submitit logs with SLURM job ids
    assert len(list((tmp_path / "slurm").glob("*_0"))) == 1 and len(list((tmp_path / "slurm").glob("*_1"))) == 1


# The launcher against stand-ins for SLURM's commands (no cluster needed): a fake sbatch on PATH that
# records the array, and "nodes" that run a submitted task as srun would, through submitit's own entry.
TINY_EVAL = "'eval.recognizers=[{name: encoder, params: {encoder: {name: tiny}}}]'"
FAKE_SBATCH = r'''#!{python}
"""Stand-in for sbatch of an array job ($FAKE_SBATCH): fail | record | results (every rank's result written at
once: rank 0 $FAKE_RESULT, the others {{}}) | node (each array task run in the background by
node.py, first preempted, then as its requeued run). Prints the job id ($FAKE_JOB_ID)."""
import os, pickle, re, subprocess, sys, pathlib
mode, job_id = os.environ["FAKE_SBATCH"], os.environ["FAKE_JOB_ID"]
if mode == "fail":
    sys.exit("sbatch: warning: one line before the error\nsbatch: error: Batch job submission failed: "
             "Invalid partition name specified")
text = open(sys.argv[1]).read()
n = int(re.search(r"--array=0-(\d+)", text).group(1)) + 1
ntasks = int(re.search(r"--ntasks-per-node=(\d+)", text).group(1)) * int(re.search(r"--nodes=(\d+)", text).group(1))
folder = text.strip().split()[-1].strip("'")
for a in range(n):
    job = f"{{job_id}}_{{a}}"
    d = pathlib.Path(folder.replace("%j", job)); d.mkdir(parents=True, exist_ok=True)
    if mode == "results":
        for t in range(ntasks):
            with open(d / f"{{job}}_{{t}}_result.pkl", "wb") as f:
                pickle.dump(eval(os.environ["FAKE_RESULT"]) if t == 0 else ("success", {{}}), f)
    if mode == "node":
        logs = f">> {{d}}/{{job}}_0_log.out 2>> {{d}}/{{job}}_0_log.err"
        node = f"{{sys.executable}} {{os.environ['FAKE_NODE']}} {{folder}} {{job_id}} {{a}}"
        script = "; ".join(f"{{node}} {{restart}} {{logs}}" for restart in (0, 1))
        subprocess.Popen(["bash", "-c", script], start_new_session=True, stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(f"Submitted batch job {{job_id}}")
'''
NODE = r'''"""One rank of an array task as srun starts it: SLURM's environment, then submitit's entry point.
$NODE_MODE: preempted (training stopped by SIGTERM on the first run, then the requeued run's
metrics) | usr1 (SIGUSR1 outside training) | fit (the real task, SIGUSR1 during its training)."""
import os, signal, sys, time
folder, array_id, index, restart = sys.argv[1:5]
os.environ.update(SLURM_JOB_ID=str(int(array_id) + 1 + int(index)), SLURM_ARRAY_JOB_ID=array_id,
                  SLURM_ARRAY_TASK_ID=index, SLURM_RESTART_COUNT=restart, SLURM_NTASKS="1", SLURM_NNODES="1",
                  SLURM_NTASKS_PER_NODE="1", SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0",
                  SLURM_JOB_NAME="id2face-tiny", SLURM_NODELIST="localhost", SUBMITIT_EXECUTOR="slurm")
import id2face.launch.task as task_module
import id2face.training as training
from submitit.core.submission import process_job

mode = os.environ["NODE_MODE"]
if mode == "preempted":
    def fake(cfg, callbacks=()):
        if restart == "0":
            raise training.Preempted("stopped by signal SIGTERM at step 3; checkpoint saved")
        return {"tiny/top1": 0.5}
    task_module.train_and_evaluate = fake
elif mode == "usr1":
    def fake(cfg, callbacks=()):  # e.g. in evaluation, after training
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.2)
        return {"tiny/top1": 0.5}
    task_module.train_and_evaluate = fake
elif mode == "fit":
    from lightning.pytorch.callbacks import Callback

    class SendUSR1(Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 1:
                os.kill(os.getpid(), signal.SIGUSR1)

    real = training.fit
    training.fit = lambda cfg, resume=True, callbacks=(), **kw: real(cfg, resume, [*callbacks, SendUSR1()], **kw)
process_job(folder)
'''


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """PATH with the fake sbatch and a scontrol that records its arguments; a fresh job-state cache."""
    from submitit.slurm.slurm import SlurmJob

    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH.format(python=sys.executable))
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/scontrol.log\n")
    (bin_dir / "sacct").write_text("#!/bin/sh\necho 'JobID|State|NodeList'\n")  # no job known: state unknown
    (tmp_path / "node.py").write_text(NODE)
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_NODE", str(tmp_path / "node.py"))
    monkeypatch.setenv("FAKE_JOB_ID", str(4000 + len(str(tmp_path)) % 97))
    SlurmJob.watcher.clear()
    yield bin_dir
    SlurmJob.watcher.clear()


def tiny_sweep(tmp_path, resources="gpus_per_node: 0", overrides=""):
    from id2face.launch.sweep import load_sweep

    path = tmp_path / "tiny.sweep.yaml"
    path.write_text(f"base: [tiny]\nseeds: [0, 1]\noverrides: [run.root={tmp_path / 'runs'}, {TINY_EVAL}{overrides}]\n"
                    f"resources: {{{resources}, cpus_per_task: 1, mem_gb: 2, timeout_min: 10}}\n")
    return load_sweep(path)


def run_node(tmp_path, mode, restart=0, timeout=600):
    """Runs array task 0 of the job the fake sbatch recorded, as its node would."""
    folder = tmp_path / "slurm" / "%j"
    env = {**os.environ, "NODE_MODE": mode}
    return subprocess.run([sys.executable, str(tmp_path / "node.py"), str(folder), os.environ["FAKE_JOB_ID"], "0",
                           str(restart)], capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)


def test_wait_takes_rank_0s_result_of_a_task_of_several_processes(tmp_path, fake_slurm, monkeypatch):
    """A task of 2 ranks (gpus_per_node: 2) has a result per rank; submitit's result() refuses it."""
    from id2face.launch.launchers import launch_slurm

    monkeypatch.setenv("FAKE_SBATCH", "results")
    monkeypatch.setenv("FAKE_RESULT", "('success', {'tiny/top1': 0.25})")
    sweep = tiny_sweep(tmp_path, "gpus_per_node: 2")
    jobs = launch_slurm(sweep, tmp_path / "slurm", sweep.resources, wait=True)
    assert [job.results() for job in jobs] == [[{"tiny/top1": 0.25}, {}]] * 2


def test_a_submitted_task_trains_on_the_nodes_and_gpus_sbatch_gives_it(tmp_path, fake_slurm, monkeypatch):
    """What the node unpickles: trainer.num_nodes/devices as resources.nodes/gpus_per_node, or
    Lightning refuses them there (\"You set num_nodes=1 in Lightning, but ... --nodes=2\")."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from id2face.launch.launchers import launch_slurm

    monkeypatch.setenv("FAKE_SBATCH", "record")
    sweep = tiny_sweep(tmp_path, "gpus_per_node: 4, nodes: 2", overrides=", trainer.strategy=ddp")
    jobs = launch_slurm(sweep, tmp_path / "slurm", sweep.resources)
    cfg = jobs[1].submission().args[0].config()
    assert (cfg.trainer.num_nodes, cfg.trainer.devices, cfg.run.seed) == (2, 4, 1)
    for key, value in {"SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "4", "SLURM_NTASKS": "8"}.items():
        monkeypatch.setenv(key, value)
    SLURMEnvironment.validate_settings(SLURMEnvironment(), cfg.trainer.devices, cfg.trainer.num_nodes)


def test_wait_reports_a_failed_tasks_reason_and_its_log(tmp_path, fake_slurm, monkeypatch):
    from id2face.launch.launchers import launch_slurm

    trace = ("Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n    raise UserError(msg)\n"
             "id2face.errors.UserError: SynthFaces oracle weights not found at /nowhere\n")
    monkeypatch.setenv("FAKE_SBATCH", "results")
    monkeypatch.setenv("FAKE_RESULT", repr(("error", trace)))
    sweep = tiny_sweep(tmp_path, "gpus_per_node: 2")
    with pytest.raises(UserError) as err:
        launch_slurm(sweep, tmp_path / "slurm", sweep.resources, wait=True)
    job = os.environ["FAKE_JOB_ID"]
    assert str(err.value).startswith(f"2 task(s) failed: tiny/base/seed0: UserError: SynthFaces oracle weights not "
                                     f"found at /nowhere (log: {tmp_path}/slurm/{job}_0/{job}_0_0_log.err); "
                                     "tiny/base/seed1: UserError: ")


def test_wait_reports_a_task_that_left_no_result_by_its_slurm_state(tmp_path, fake_slurm, monkeypatch):
    from submitit.slurm.slurm import SlurmJob

    from id2face.launch.launchers import launch_slurm

    job = os.environ["FAKE_JOB_ID"]
    (fake_slurm / "sacct").write_text(f"#!/bin/sh\nprintf 'JobID|State|NodeList\\n{job}_[0-1]|OUT_OF_MEMORY|n1\\n'\n")
    (fake_slurm / "sacct").chmod(0o755)
    monkeypatch.setenv("FAKE_SBATCH", "record")
    monkeypatch.setattr(SlurmJob, "_results_timeout_s", 0)
    sweep = tiny_sweep(tmp_path)
    with pytest.raises(UserError, match=r"tiny/base/seed0: ended without a result \(SLURM state: OUT_OF_MEMORY\) "
                                        rf"\(log: .*/{job}_0_0_log\.err\)"):
        launch_slurm(sweep, tmp_path / "slurm", sweep.resources, wait=True)


def test_wait_waits_for_a_preempted_task_through_its_requeued_run(tmp_path, fake_slurm, monkeypatch):
    """SLURM's requeue stops training with SIGTERM (fit raises Preempted): that run must leave no
    result, or the waiter reports the task failed while its requeued run goes on to succeed."""
    from id2face.launch.launchers import launch_slurm

    monkeypatch.setenv("FAKE_SBATCH", "node")
    monkeypatch.setenv("NODE_MODE", "preempted")
    sweep = tiny_sweep(tmp_path)
    jobs = launch_slurm(sweep, tmp_path / "slurm", sweep.resources, wait=True)
    assert jobs[0].results() == [{"tiny/top1": 0.5}]
    log = next((tmp_path / "slurm").rglob("*_0_log.err")).read_text()
    assert "stopped by signal SIGTERM at step 3" in log and "requeued" in log


def test_usr1_outside_training_requeues_the_array_task_instead_of_killing_it(tmp_path, fake_slurm, monkeypatch):
    """SLURM's warning before the time limit may come while judges are built or the model is
    evaluated: its default action ended the task there, neither requeued nor evaluated."""
    from id2face.launch.launchers import launch_slurm

    monkeypatch.setenv("FAKE_SBATCH", "record")
    sweep = tiny_sweep(tmp_path)
    launch_slurm(sweep, tmp_path / "slurm", sweep.resources)
    node = run_node(tmp_path, "usr1")
    assert node.returncode == 0, node.stderr[-3000:]
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", f"{os.environ['FAKE_JOB_ID']}_0"]


def test_usr1_during_training_is_still_lightnings_and_the_requeued_run_evaluates(tmp_path, fake_slurm, monkeypatch):
    """Lightning sets its SLURM handler only where none is: the task's hands the signal to it (an
    hpc checkpoint, then the requeue); the restarted task resumes with 0 steps left and evaluates."""
    import json

    from id2face.launch.launchers import launch_slurm

    monkeypatch.setenv("FAKE_SBATCH", "record")
    sweep = tiny_sweep(tmp_path, overrides=", trainer.max_steps=2, data.batch_size=2, trainer.limit_val_batches=0, "
                                           "data.dataset.params.num_identities=40, eval.limit=4, eval.diversity_k=1")
    launch_slurm(sweep, tmp_path / "slurm", sweep.resources)
    node = run_node(tmp_path, "fit")
    assert node.returncode == 0, node.stderr[-3000:]
    folder = tmp_path / "runs" / "tiny" / "base" / "seed0"
    assert list(folder.glob("hpc_ckpt_*.ckpt")) and (folder / "metrics.json").is_file()
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", f"{os.environ['FAKE_JOB_ID']}_0"]
    (folder / "metrics.json").unlink()
    node = run_node(tmp_path, "fit", restart=1)
    assert node.returncode == 0, node.stderr[-3000:]
    assert json.loads((folder / "train_state.json").read_text())["global_step"] == 2
    assert "tiny/top1" in json.loads((folder / "metrics.json").read_text())["metrics"]


def test_a_refused_submission_is_sbatchs_error_on_one_line(tmp_path, fake_slurm, monkeypatch, capsys):
    from id2face.cli import main

    monkeypatch.setenv("FAKE_SBATCH", "fail")
    sweep = tiny_sweep(tmp_path)
    assert main(["sweep", str(sweep.path), "--partition", "nope", "--folder", str(tmp_path / "slurm")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == ["id2face sweep: error: sbatch refused the array job: sbatch: error: Batch job "
                                "submission failed: Invalid partition name specified"], err
