"""A closed-form edit (`--method uce`) as a run: the same set-up as training up to the model (`setup.open_accelerator`,
`setup.load_model`), then one solve instead of a loop, and the same run folder: run.json, one line of metrics.jsonl,
erased.safetensors. Export, apply, sample, eval, attack and the benchmark read it as any run."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from concept_erase import provenance
from concept_erase.config import EraseConfig, config_json
from concept_erase.errors import UserError
from concept_erase.export.delta import base_fingerprint, save_delta
from concept_erase.io.atomic import write_json
from concept_erase.methods.edits import EDITS
from concept_erase.training import setup
from concept_erase.training.hardware import describe_device
from concept_erase.training.run_folder import STAGING, make_run_folder, swap_in, unfinished_run_discarded


class EditRun:
    def __init__(self, config: EraseConfig, pipe=None):
        config.check_runnable()
        self.config = config
        self.pipe = pipe
        self.previous = None  # an edit continues no chain (--weights is a training setting)

    def log(self, message: str) -> None:
        if self.accelerator.is_main_process:
            print(message)

    def run(self) -> Path:
        with unfinished_run_discarded(self):
            return self._run()

    def _run(self) -> Path:
        setup.open_accelerator(self)
        setup.load_model(self)
        cfg, acc, family, pipe = self.config, self.accelerator, self.family, self.pipe
        if acc.num_processes > 1:
            raise UserError(f"--method {cfg.method} is a closed-form edit of seconds: run it as one process")
        for encoder in family.text_encoders(pipe):
            encoder.to(acc.device)
        denoiser = family.denoiser(pipe)
        self.log(describe_device(acc.device, cfg.mixed_precision, denoiser, time.perf_counter() - self.load_started,
                                 trains=False))
        edit = EDITS.get(cfg.method)(cfg)
        t0 = time.perf_counter()
        new, summary = edit.edit(pipe, family, *self.variants, acc.device)
        seconds = time.perf_counter() - t0
        params = dict(denoiser.named_parameters())
        fingerprint = base_fingerprint(denoiser, {n: params[n] for n in new}, lora=False, digest=self.base_digest)
        self.log(f"{cfg.method}: {summary['layers']} layers solved for {summary['concept_prompts']} concept prompt(s) "
                 f"and {summary['kept_prompts']} kept in {seconds:.2f} s; the concepts' outputs are now "
                 f"{summary['guide_residual']:.1%} as far from their guides' as before")
        make_run_folder(self.output, replace=self.replacing)
        if self.replacing:
            self.output = self.final_output / STAGING
        write_json(self.output / "run.json", {"config": json.loads(config_json(cfg)), "num_processes": 1,
                                              "sharded": False, "base_model_digest": self.base_digest,
                                              "resumed_from_step": 0, "changed_on_resume": {},
                                              "edit": summary, **provenance.record(), "finished": provenance.now()})
        # One line, as a training step's: the edit is one update, its time the step's time.
        record = {"step": 1, "loss_forget": None, "loss_retain": None, "lambda": 0.0, "grad_norm": None,
                  "backward_passes": 0, "edit": cfg.method, "guide_residual": summary["guide_residual"],
                  "step_time_s": seconds}
        (self.output / "metrics.jsonl").write_text(json.dumps(record) + "\n", encoding="utf-8")
        save_delta(self.output / "erased.safetensors", denoiser, new, config=cfg, fingerprint=fingerprint, steps=1,
                   lambda_final=0.0, family=family, edit=family.edit_subset)
        if self.replacing:
            swap_in(self.final_output)
            self.replacing = False
            self.output = self.final_output
        return self.output / "erased.safetensors"


@torch.no_grad()
def edit(config: EraseConfig, pipe=None) -> Path:
    return EditRun(config, pipe).run()
