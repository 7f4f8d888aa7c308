"""The library leaves the caller's environment alone; the command line applies its offline defaults first."""

import os
import subprocess
import sys

from concept_erase.env import CLI_DEFAULTS

CLEAN = {k: v for k, v in os.environ.items() if k not in CLI_DEFAULTS}


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], env=CLEAN, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_importing_the_library_changes_no_environment_variable():
    out = _run("import os; before = dict(os.environ)\n"
               "import concept_erase, concept_erase.export.delta, concept_erase.training.trainer, concept_erase.cli\n"
               "import huggingface_hub.constants as c\n"
               "print(dict(os.environ) == before, c.HF_HUB_OFFLINE)")
    assert out == "True False"


def test_the_command_line_sets_its_defaults_before_the_hub_reads_them_and_a_set_value_wins():
    code = ("import contextlib, io, os\nfrom concept_erase.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n    main([])\n"
            "import huggingface_hub.constants as c\n"
            "print(os.environ.get('HF_HUB_OFFLINE'), c.HF_HUB_OFFLINE, os.environ.get('DIFFUSERS_VERBOSITY'))")
    assert _run(code) == "1 True error"
    done = subprocess.run([sys.executable, "-c", code], env={**CLEAN, "HF_HUB_OFFLINE": "0"}, capture_output=True,
                          text=True, timeout=300)
    assert done.stdout.strip() == "0 False error", done.stderr


def test_a_hub_id_without_a_network_says_the_hub_cannot_be_reached_at_once(tmp_path):
    """With the Hub on and no way to reach it, one short probe says so (not the Hub client's half-minute of retries
    ending in 'no model_index.json')."""
    import time

    env = {**CLEAN, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens on port 9
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "concept_erase", "sample", "--model", "someone/some-model",
                           "--prompt", "x", "--output", str(tmp_path / "s")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2 and "could not be reached" in done.stderr, done.stderr
    assert time.perf_counter() - t0 < 25 and not (tmp_path / "s").exists()


def test_the_library_casts_a_model_without_diffusers_warning_on_every_cast():
    """diffusers warns "should be kept in float32: []" on any dtype cast; the library's own casts leave it out."""
    code = ("import torch\nfrom concept_erase.io.loading import cast, load_pipeline\n"
            "pipe = load_pipeline('builtin:tiny')\n"
            "print(cast(pipe.unet, torch.bfloat16).dtype, cast(pipe.vae, torch.float32) is pipe.vae)")
    done = subprocess.run([sys.executable, "-c", code], env=CLEAN, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "torch.bfloat16 True", done.stderr
    assert "kept in float32" not in done.stderr, done.stderr
