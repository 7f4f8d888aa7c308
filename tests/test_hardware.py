"""Real hardware on the main path: mixed precision from a cold cache, fp16's gradient scale in UNGrad,
--resolution, memory options, the cost estimate, and one line for anything that goes wrong."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from concept_erase.families.base import Cond

from concept_erase.training import trainer as trainer_module
from concept_erase.training.banks import bank_key
from concept_erase.cli import main
from concept_erase.config import EraseConfig
from concept_erase.errors import UserError
from concept_erase.training.trainer import Trainer, erase

from helpers import unet_probe


def erase_args(model, out, cache, *extra):
    return ["erase", "--model", str(model), "--concept", "van gogh", "--anchor", "a painting", "--output", str(out),
            "--steps", "2", "--sampling-steps", "4", "--anchor-inference-steps", "2", "--anchor-images-per-prompt", "2",
            "--cache-dir", str(cache), "--no-progress", "--checkpoint-every", "0", *extra]


def one_line_error(capsys, code, expected_code, message):
    err = capsys.readouterr().err
    assert code == expected_code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("concept-erase: error:") and "Traceback" not in err, err
    assert message in err, err
    return err


@pytest.mark.parametrize("model", ["tiny", "digits"])
def test_bf16_erase_from_an_empty_cache(model, tiny_dir, tmp_path, capsys):
    """The crash of the issue: anchor images generated outside autocast met the bf16 frozen weights."""
    source = tiny_dir if model == "tiny" else "builtin:digits"
    cache = tmp_path / "empty-cache"
    assert not cache.exists()
    # the denoising retain loss: nonzero from the first step (the preservation loss starts at 0)
    code = main(erase_args(source, tmp_path / "run", cache, "--mixed-precision", "bf16", "--train", "full",
                           "--retain-loss", "denoising"))
    assert code == 0, capsys.readouterr().err
    assert list(cache.glob("anchor-*.safetensors"))  # generated now, not found in a cache
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["loss_retain"] > 0 for r in rows)


def test_bf16_remap_generates_concept_images_from_a_cold_cache(fresh_pipe, make_config):
    """The remap loss needs images of the concept, which a cold cache does not have: under bf16 they are generated,
    cached, and the run trains on them (finite losses, a finite delta that changes the trained weights)."""
    from concept_erase.export.delta import read_delta

    cfg = make_config(mixed_precision="bf16", forget_loss="remap", remap_to=["a photo"], steps=2)
    assert not Path(cfg.cache_dir).exists()  # cold
    delta = erase(cfg, pipe=fresh_pipe)
    assert any(Path(cfg.cache_dir).rglob("*")), "no image latents were cached"
    rows = [json.loads(line) for line in (Path(cfg.output) / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(r["loss_forget"]) and r["loss_forget"] > 0 for r in rows)
    tensors, _ = read_delta(delta)
    assert tensors and all(torch.isfinite(t).all() for t in tensors.values())
    assert any(t.abs().max() > 0 for t in tensors.values())


def test_image_cache_key_holds_precision_and_resolution(tiny_pipe):
    def key(**kw):
        cfg = EraseConfig(**{"model": "m", "concepts": ["c"], **kw})
        return bank_key(base_digest="d", prompts=["a"], per_prompt=2, config=cfg, role="anchor",
                        scheduler_config=tiny_pipe.scheduler.config, resolution=kw.pop("res", 32))

    assert key() != key(mixed_precision="bf16")
    assert key() != key(mixed_precision="fp16")
    base = EraseConfig(model="m", concepts=["c"])
    k32 = bank_key(base_digest="d", prompts=["a"], per_prompt=2, config=base, role="anchor",
                   scheduler_config=tiny_pipe.scheduler.config, resolution=32)
    k64 = bank_key(base_digest="d", prompts=["a"], per_prompt=2, config=base, role="anchor",
                   scheduler_config=tiny_pipe.scheduler.config, resolution=64)
    assert k32 != k64 and key() == key()


def test_fp16_without_cuda_is_refused_before_the_output_exists(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(erase_args(tiny_dir, out, tmp_path / "c", "--mixed-precision", "fp16"))
    one_line_error(capsys, code, 2, "fp16 needs a CUDA GPU")
    assert not out.exists()


def test_adamw8bit_without_cuda_is_one_line(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(erase_args(tiny_dir, out, tmp_path / "c", "--optimizer", "adamw8bit"))
    one_line_error(capsys, code, 2, "adamw8bit runs on CUDA GPUs only")
    assert not out.exists()


def test_ungrad_closed_form_takes_unscaled_gradients(tiny_pipe, make_config, monkeypatch):
    """Under fp16 the gradients carry the scaler's factor S; <g_r, g_u> and ||g_r||^2 must not carry S^2."""

    class Scaler:  # what Accelerate's fp16 GradScaler does to backward, with a factor of our choosing
        def __init__(self, s):
            self.s = s

        def scale(self, loss):
            return loss * self.s

        def get_scale(self):
            return self.s

        def is_enabled(self):
            return True

    seen = {}
    for s in (1.0, 1024.0):
        trainer = Trainer(make_config(method="ungrad", eps=0.05, max_grad_norm=0, steps=1, retain_loss="denoising",
                                      output=str(make_config().output) + f"-{int(s)}"), pipe=copy.deepcopy(tiny_pipe))
        trainer._setup()
        if s != 1.0:
            trainer.accelerator.scaler = Scaler(s)
        monkeypatch.setattr(trainer.controller, "from_gradients",
                            lambda dot, norm, _s=s, _f=trainer.controller.from_gradients: (
                                seen.__setitem__(_s, (dot, norm)), _f(dot, norm))[1])
        trainer._step(0)
    (dot1, norm1), (dot_s, norm_s) = seen[1.0], seen[1024.0]
    assert norm1 > 0
    assert dot_s == pytest.approx(dot1, rel=1e-4, abs=1e-12) and norm_s == pytest.approx(norm1, rel=1e-4)


def test_ungrad_combines_the_gradients_in_place(fresh_pipe, make_config, monkeypatch):
    """g_u + lambda g_r is made in g_r's buffers: no third gradient vector at the optimizer step."""
    trainer = Trainer(make_config(method="ungrad", max_grad_norm=0, steps=1), pipe=fresh_pipe)
    trainer._setup()
    real = trainer_module.surgery_products
    buffers, at_step = {}, {}

    def spy(g_u, g_r, scale=1.0):
        buffers["r"] = [b.data_ptr() for b in g_r]
        buffers["u"] = [a.detach().clone() for a in g_u]
        buffers["r_values"] = [b.detach().clone() for b in g_r]
        return real(g_u, g_r, scale)

    monkeypatch.setattr(trainer_module, "surgery_products", spy)
    monkeypatch.setattr(trainer.optimizer, "step", lambda *a, **k: at_step.update(
        ptr=[p.grad.data_ptr() for p in trainer.params], grads=[p.grad.clone() for p in trainer.params]))
    trainer._step(0)
    assert at_step["ptr"] == buffers["r"]
    lam = trainer.controller.current()
    for g, a, b in zip(at_step["grads"], buffers["u"], buffers["r_values"]):
        torch.testing.assert_close(g, a + lam * b)


def test_resolution_sets_every_latent_size(fresh_pipe, make_config):
    trainer = Trainer(make_config(resolution=48, steps=1), pipe=fresh_pipe)  # native 32, VAE factor 2
    trainer.run()
    assert trainer.ctx.latent_shape[1:] == (24, 24)
    assert trainer.retain.bank.latents.shape[-2:] == (24, 24)
    assert trainer.forget.batch(trainer_module.step_generator(0, 0, 0, 0), 1, 0).latents.shape[-2:] == (24, 24)


def test_resolution_the_model_cannot_take_is_one_line(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(erase_args(tiny_dir, out, tmp_path / "c", "--resolution", "30"))
    one_line_error(capsys, code, 2, "needs a multiple of 8 pixels")
    assert not out.exists()


def test_gradient_checkpointing_gives_the_same_step(tiny_pipe, make_config):
    weights = []
    for flag in (False, True):
        pipe = copy.deepcopy(tiny_pipe)
        cfg = make_config(method="fixed", lambda_init=0.5, steps=2, gradient_checkpointing=flag,
                          output=str(make_config().output) + str(flag))
        erase(cfg, pipe=pipe)
        assert pipe.unet.is_gradient_checkpointing == flag
        weights.append({n: p.detach().clone() for n, p in pipe.unet.named_parameters() if ".attn2." in n})
    for n in weights[0]:
        torch.testing.assert_close(weights[0][n], weights[1][n], rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_on_a_model_without_it_is_refused(fresh_pipe, make_config, tmp_path):
    fresh_pipe.unet._supports_gradient_checkpointing = False
    with pytest.raises(UserError, match="has no gradient checkpointing"):
        erase(make_config(gradient_checkpointing=True), pipe=fresh_pipe)
    assert not (tmp_path / "run").exists()


def test_bf16_original_copy_is_exact_for_cross_attention(tiny_pipe, make_config):
    """Under bf16 autocast the Linear weights are cast to bf16 anyway: a bf16 copy of attn2 gives the
    very same original predictions (and half the memory)."""
    outs = []
    for copy_dtype in ("fp32", "bf16"):
        trainer = Trainer(make_config(mixed_precision="bf16", original_copy=copy_dtype, steps=1,
                                      output=str(make_config().output) + copy_dtype), pipe=copy.deepcopy(tiny_pipe))
        trainer._setup()
        with torch.no_grad():  # move the trained weights away: the original model must not see them
            for p in trainer.params:
                p.add_(0.5)
        x, t, emb = unet_probe(tiny_pipe.unet)
        outs.append(trainer.ctx.original(x, t, Cond(encoder_hidden_states=emb)).float())
        nbytes = trainer.ctx.original_model.nbytes()
        assert {v.dtype for v in trainer.ctx.original_model.original.values()} == \
            {torch.float32 if copy_dtype == "fp32" else torch.bfloat16}
        if copy_dtype == "bf16":
            assert nbytes * 2 == fp32_bytes
        fp32_bytes = nbytes
    assert torch.equal(outs[0], outs[1])


def test_bf16_original_copy_needs_bf16_autocast():
    with pytest.raises(UserError, match="needs --mixed-precision bf16"):
        EraseConfig(model="m", concepts=["c"], original_copy="bf16")


def test_a_crash_inside_the_trainer_is_one_line_and_debug_shows_it(tiny_dir, tmp_path, capsys, monkeypatch):
    def boom(self, step):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore details")

    monkeypatch.setattr(Trainer, "_step", boom)
    code = main(erase_args(tiny_dir, tmp_path / "run", tmp_path / "c"))
    err = one_line_error(capsys, code, 1, "RuntimeError: CUDA out of memory")
    assert "--debug" in err and "lower --resolution" in err
    with pytest.raises(RuntimeError):
        main(erase_args(tiny_dir, tmp_path / "run2", tmp_path / "c", "--debug"))


def test_device_and_cost_estimate_come_before_anchor_generation(tiny_dir, tmp_path, capsys):
    assert main(erase_args(tiny_dir, tmp_path / "run", tmp_path / "c", "--anchor", "a photo")) == 0
    text = capsys.readouterr().out
    assert "device: cpu" in text and "one step" in text
    assert text.index("device: cpu") < text.index("first UNet2DConditionModel call") < text.index("anchor images: first prompt took")
    assert text.index("anchor images: first prompt took") < text.index("erased weights:")


def test_a_finished_run_keeps_its_last_checkpoint_only(fresh_pipe, make_config):
    cfg = make_config(steps=4, checkpoint_every=1, checkpoints_total_limit=2)
    erase(cfg, pipe=fresh_pipe)
    kept = sorted(p.name for p in (Path(cfg.output) / "checkpoints").iterdir())
    assert kept == ["step-00000004"]


def test_training_switches_cudnn_attention_off_and_back(monkeypatch):
    """cuDNN's SDPA backward gave NaN gradients and an illegal memory access on an H200 (torch 2.11): training
    runs without it and leaves the process's setting as it found it."""
    import torch

    from concept_erase.training.hardware import no_cudnn_attention

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        with no_cudnn_attention():
            assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)
