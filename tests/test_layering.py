"""The layers as DESIGN says: what must stay pure Python stays so (plan, fleet, configs,
the run spec and the backend's tables import no jax), and the command-line entry point
loads without jax until a command needs it."""

import subprocess
import sys
from pathlib import Path

JAX_FREE = (
    "megamesh.settings", "megamesh.config", "megamesh.runspec", "megamesh.train.config",
    "megamesh.model.specs", "megamesh.model.source", "megamesh.model.hf", "megamesh.model.backend",
    "megamesh.plan.search", "megamesh.plan.questions", "megamesh.plan.report",
    "megamesh.fleet.sim", "megamesh.fleet.questions", "megamesh.fleet.launch",
    "megamesh.fleet.scenario", "megamesh.fleet.serve_launch", "megamesh.cli", "megamesh.serve.kvpool",
    "megamesh.serve.scheduler", "megamesh.serve.multihost",
    "megamesh.serve.output",
)

CODE = f"""
import dataclasses, importlib, sys
for name in {JAX_FREE!r}:
    importlib.import_module(name)
from megamesh.cli import main
from megamesh.fleet.scenario import default_scenario
from megamesh.fleet.sim import simulate
assert main(["plan", "--model", "llama3.1-8b", "--target", "tpu7x:256", "--json"]) == 0
assert main(["plan", "--target", "v5p:8", "--batch", "8", "--mesh", "fsdp=4,tensor=2", "--json"]) == 0
simulate(dataclasses.replace(default_scenario(), end="2026-02-01"))
bad = [m for m in sys.modules if m == "jax" or m.startswith("jax.")]
assert not bad, bad
"""


def test_planner_fleet_and_configs_never_import_jax():
    """One fresh interpreter (jax may already be loaded in this one)."""
    r = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def test_the_train_step_and_gpu_benchmark_import_without_grain():
    """Grain is the training data pipeline's, imported where a dataset is built: the train
    step, the serving engine and bench/gpu_train.py load on a machine without it (the GPU
    image has jax, torch and orbax, not grain)."""
    code = ("import sys; sys.modules['grain'] = None; sys.path.insert(0, 'bench'); "
            "import megamesh.train.loop, megamesh.train.step, megamesh.serve.engine, gpu_train")
    subprocess.run([sys.executable, "-c", code], check=True,
                   cwd=Path(__file__).resolve().parent.parent)


def test_imports_flow_one_way():
    """The model knows nothing of run specs, sharding nothing of the model's forward, the
    server's protocol core nothing of the Messages API's caching, and the load generator
    nothing of the server (fresh interpreters: each import alone)."""
    cases = {"megamesh.model.transformer": ["megamesh.runspec"],
             "megamesh.sharding.rules": ["megamesh.model.transformer"],
             "megamesh.serve.core": ["megamesh.serve.anthropic", "megamesh.serve.anthropic_content"],
             "megamesh.loadgen": ["megamesh.serve"]}
    for module, banned in cases.items():
        code = (f"import sys, {module}; bad = [m for m in {banned!r} if m in sys.modules]; "
                "assert not bad, bad")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, (module, r.stderr[-2000:])
