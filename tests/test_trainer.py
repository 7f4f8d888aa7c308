"""The trainer on the tiny model: what changes, what must not, pairing, precision, resume."""

import copy
import math

import pytest
import torch

from concept_erase.families.base import Cond

from concept_erase.training.subsets import select_trainable
from concept_erase.training.trainer import Trainer, erase

from helpers import changed, metrics, snapshot, unet_out, unet_probe


def expected_subset(pipe, subset):
    unet = copy.deepcopy(pipe.unet)
    return set(select_trainable(unet, subset))


@pytest.mark.parametrize("method", ["eupmu", "eupmu-fast", "ungrad", "fixed", "esd"])
def test_each_method_trains_only_cross_attention(method, fresh_pipe, make_config):
    cfg = make_config(method=method, lambda_init=0.5)
    unet_before, text_before, vae_before = snapshot(fresh_pipe.unet), snapshot(fresh_pipe.text_encoder), snapshot(fresh_pipe.vae)
    path = erase(cfg, pipe=fresh_pipe)
    moved = changed(unet_before, fresh_pipe.unet)
    subset = expected_subset(fresh_pipe, "xattn")
    assert moved == subset, f"changed outside the subset: {sorted(moved ^ subset)[:3]}"
    assert not changed(text_before, fresh_pipe.text_encoder)
    assert not changed(vae_before, fresh_pipe.vae)
    rows = metrics(cfg.output)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert set(r) >= {"loss_forget", "loss_retain", "lambda", "step_time_s"}
        assert (r["loss_retain"] is None) == (method == "esd")
    if method == "fixed":
        assert all(r["lambda"] == 0.5 for r in rows)
    assert path.is_file()


@pytest.mark.parametrize("subset", ["xattn-kv", "noxattn", "selfattn", "full"])
def test_subsets_change_exactly_what_they_name(subset, fresh_pipe, make_config):
    before = snapshot(fresh_pipe.unet)
    erase(make_config(method="fixed", train=subset, steps=2), pipe=fresh_pipe)
    assert changed(before, fresh_pipe.unet) == expected_subset(fresh_pipe, subset)


def test_subset_names():
    from concept_erase.io.tiny import build_tiny_pipeline

    unet = build_tiny_pipeline().unet
    kv = set(select_trainable(copy.deepcopy(unet), "xattn-kv"))
    assert kv and all(".attn2.to_k." in n or ".attn2.to_v." in n for n in kv)
    nox = set(select_trainable(copy.deepcopy(unet), "noxattn"))
    assert not any(".attn2." in n or n.startswith(("time_embedding.", "conv_out.")) for n in nox)
    assert any(".attn1." in n for n in nox) and any("resnets" in n for n in nox)


def test_lora_trains_only_the_adapter(fresh_pipe, make_config):
    before = snapshot(fresh_pipe.unet)
    trainer = Trainer(make_config(method="eupmu", train="lora"), pipe=fresh_pipe)
    trainer.run()
    state = fresh_pipe.unet.state_dict()
    lora = {n for n in state if "lora_" in n}
    assert lora and all(n not in before for n in lora)
    for n, t in before.items():  # every base weight, now under base_layer, is untouched
        key = n if n in state else n.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(state[key], t), n
    assert any(not torch.equal(state[n], torch.zeros_like(state[n])) for n in lora if "lora_B" in n)


@pytest.mark.parametrize("train", ["xattn", "lora"])
def test_original_predictions_are_bit_identical_after_training(train, tiny_pipe, fresh_pipe, make_config):
    probe = unet_probe(tiny_pipe.unet)
    expected = unet_out(tiny_pipe.unet, probe)
    trainer = Trainer(make_config(method="fixed", train=train), pipe=fresh_pipe)
    trainer.run()
    assert not torch.equal(unet_out(fresh_pipe.unet, probe), expected)  # the model did move
    x, t, emb = probe
    assert torch.equal(trainer.ctx.original(x, t, Cond(encoder_hidden_states=emb)), expected)
    if train == "xattn":  # only the trained tensors are copied: no second UNet
        assert trainer.ctx.original_model.nbytes() == sum(p.numel() * 4 for p in trainer.trained.values())


@pytest.mark.parametrize("probe", ["held-out", "batch"])
def test_eupmu_probe_is_paired(probe, fresh_pipe, make_config, monkeypatch):
    """With the step made a no-op, l_r before and after come from the same tuple: the slack is eps (the
    paper's rule, whose slack is in loss per unit learning rate). The denoising retain loss: the preservation
    loss of an unchanged model is 0 on every tuple, so a no-op step could not tell a paired tuple from another.

    (Up to float rounding: the held-out tuple's loss before the step is read in the previous step's
    no-grad call, beside other rows; an unpaired tuple would be off by ~(loss spread) / lr, i.e. ~100.)
    """
    trainer = Trainer(make_config(method="eupmu", eps=0.25, lambda_init=1.0, steps=3, slack_probe=probe,
                                  lambda_update="paper", retain_loss="denoising"),
                      pipe=fresh_pipe)
    trainer._setup()
    monkeypatch.setattr(trainer.optimizer, "step", lambda *a, **k: None)
    for step in range(3):
        trainer._step(step)
        assert trainer.controller.last_slack == pytest.approx(0.25, abs=1e-6 / trainer.config.lr)
        if probe == "held-out" and step < 2:  # the next step's own fresh tuple, measured at theta_{t+1}
            pb, before = trainer.probe.ready[step + 1][0]
            expected = trainer.probe.held_out(step + 1, 0, 0, trainer.config.retain_batch_size)
            assert torch.equal(pb.latents, expected.latents) and torch.equal(pb.target, expected.target)
            with torch.no_grad():
                assert float(before) == pytest.approx(float(trainer._forward(expected).mean()), rel=1e-5)
    assert trainer.probe.ready == {}  # nothing measured past the last step


@pytest.mark.parametrize("probe", ["held-out", "batch"])
def test_eupmu_fast_pairs_the_carried_tuple(probe, fresh_pipe, make_config, monkeypatch):
    """The carried tuple's loss at theta_{t+1} pairs with its loss at theta_t: with a no-op step the slack is eps
    (the denoising retain loss, nonzero on an unchanged model; see test_eupmu_probe_is_paired)."""
    trainer = Trainer(make_config(method="eupmu-fast", eps=0.5, retain_batch_size=4, steps=3, slack_probe=probe,
                                  lambda_update="paper", retain_loss="denoising"),
                      pipe=fresh_pipe)
    trainer._setup()
    monkeypatch.setattr(trainer.optimizer, "step", lambda *a, **k: None)
    trainer._step(0)
    assert trainer.controller.last_slack is None  # nothing carried yet
    trainer._step(1)
    assert trainer.controller.last_slack == pytest.approx(0.5, abs=1e-6 / trainer.config.lr)


@pytest.mark.parametrize("method", ["eupmu", "eupmu-fast"])
def test_held_out_probe_is_outside_the_gradient(method, fresh_pipe, make_config, monkeypatch):
    """The slack's tuple must not be one the step descends on (that biases lambda toward 0); eupmu-fast
    trains on it one step later, after its loss at theta_{t+1} has been read."""
    trainer = Trainer(make_config(method=method, retain_batch_size=4, steps=3), pipe=fresh_pipe)
    trainer._setup()
    seen = []
    real_losses = Trainer._losses

    def spy(self, batch, forget=None):
        seen.append((torch.is_grad_enabled(), batch.latents.detach().clone()))
        return real_losses(self, batch, forget)

    monkeypatch.setattr(Trainer, "_losses", spy)
    trained_before: list[torch.Tensor] = []
    for step in range(3):
        seen.clear()
        trainer._step(step)
        trained = torch.cat([x for g, x in seen if g])
        probed = [x for g, x in seen if not g]
        assert probed
        for x in probed:  # no probe row is among the rows this step descends on
            assert not any(torch.equal(row, t) for row in x for t in trained)
        if method == "eupmu-fast" and step > 0:  # last step's probe is trained on now
            assert all(any(torch.equal(row, t) for t in trained) for row in trained_before)
        trained_before = [row for row in probed[-1]]


@pytest.mark.parametrize("method", ["fixed", "eupmu"])
def test_joint_step_gradient_is_that_of_the_two_losses_computed_apart(method, fresh_pipe, make_config, monkeypatch):
    """The step joins the forget and retain rows in one UNet call: its gradient must be exactly
    grad(l_u + lambda * l_r) with each loss computed on its own batch."""
    trainer = Trainer(make_config(method=method, lambda_init=0.7, retain_batch_size=3, max_grad_norm=0, steps=1),
                      pipe=fresh_pipe)
    trainer._setup()
    batches, grads = {}, {}
    forget_batch, retain_batch = trainer.forget.batch, trainer._retain_batch
    monkeypatch.setattr(trainer.forget, "batch", lambda *a, **kw: batches.setdefault("u", forget_batch(*a, **kw)))
    monkeypatch.setattr(trainer, "_retain_batch", lambda *a: batches.setdefault("r", retain_batch(*a)))
    monkeypatch.setattr(trainer.optimizer, "step", lambda *a, **k: grads.update(
        {i: p.grad.clone() for i, p in enumerate(trainer.params)}))
    trainer._step(0)
    fb, (rb, _) = batches["u"], batches["r"]
    loss = trainer._forward(fb).mean() + 0.7 * trainer._forward(rb).mean()
    loss.backward()
    assert len(grads) == len(trainer.params) > 0
    for i, p in enumerate(trainer.params):
        torch.testing.assert_close(grads[i], p.grad, rtol=1e-4, atol=1e-7)


def test_sgd_takes_the_plain_gradient_step(fresh_pipe, make_config, monkeypatch):
    """--optimizer sgd: theta_{t+1} = theta_t - lr * g, the step the EUPMU slack and UNGrad assume."""
    trainer = Trainer(make_config(method="fixed", lambda_init=0.7, optimizer="sgd", lr=0.5, steps=1), pipe=fresh_pipe)
    trainer._setup()
    before = [p.detach().clone() for p in trainer.params]
    grads, real_step = [], trainer.optimizer.step
    monkeypatch.setattr(trainer.optimizer, "step", lambda *a, **k: (
        grads.extend(p.grad.clone() for p in trainer.params), real_step(*a, **k))[-1])
    trainer._step(0)
    assert grads and any(g.abs().max() > 0 for g in grads)
    for p, b, g in zip(trainer.params, before, grads):
        torch.testing.assert_close(p.detach(), b - 0.5 * g, rtol=1e-5, atol=1e-8)


def test_resume_refuses_another_optimizer(tiny_pipe, make_config, tmp_path):
    from concept_erase.errors import UserError

    erase(make_config(steps=2, checkpoint_every=1, output=str(tmp_path / "r")), pipe=copy.deepcopy(tiny_pipe))
    with pytest.raises(UserError, match='--optimizer "adamw", this resume asks for "sgd"'):
        erase(make_config(steps=3, output=str(tmp_path / "r"), resume="latest", optimizer="sgd"),
              pipe=copy.deepcopy(tiny_pipe))


def test_lambda_rises_when_retain_is_hurt(fresh_pipe, make_config):
    """A large step that hurts the anchors must raise lambda (the sign of the update)."""
    cfg = make_config(method="eupmu", lr=3e-2, beta=1e-3, steps=4, eps=0.0)
    erase(cfg, pipe=fresh_pipe)
    lams = [r["lambda"] for r in metrics(cfg.output)]
    assert lams[0] == 0.0 and max(lams) > 0.0


@pytest.mark.parametrize("model", ["epsilon", "v_prediction"])
def test_retain_target_uses_the_models_prediction_type(model, make_config):
    from concept_erase.io.tiny import build_tiny_pipeline
    from concept_erase.training.trainer import step_generator

    pipe = build_tiny_pipeline(prediction_type=model)
    trainer = Trainer(make_config(method="fixed", retain_loss="denoising"), pipe=pipe)
    trainer._setup()
    batch = trainer.retain.batch(step_generator(0, 0, 0, 0), 4, 0)
    a = trainer.ctx.schedule.alphas_cumprod[batch.timesteps].reshape(-1, 1, 1, 1)
    if model == "epsilon":
        x0 = (batch.latents - (1 - a).sqrt() * batch.target) / a.sqrt()
    else:
        x0 = a.sqrt() * batch.latents - (1 - a).sqrt() * batch.target
    bank = trainer.retain.bank.latents
    assert all(any(torch.allclose(x, b, atol=1e-4) for b in bank) for x in x0)


def test_bf16_runs_and_keeps_fp32_bookkeeping(fresh_pipe, make_config):
    """Under bf16 the losses and lambda are kept in fp32: a value reduced in bf16 would be one of bf16's numbers
    (3 significant digits), and every logged loss would be. The denoising retain loss: nonzero from the first step."""
    cfg = make_config(method="eupmu", mixed_precision="bf16", steps=3, lambda_init=0.3, retain_loss="denoising")
    trainer = Trainer(cfg, pipe=fresh_pipe)
    trainer.run()
    assert all(p.dtype == torch.float32 for p in trainer.trained.values())
    trained_ids = {id(p) for p in trainer.trained.values()}
    frozen = [p for p in fresh_pipe.unet.parameters() if id(p) not in trained_ids]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)  # frozen weights stored in bf16
    rows = metrics(cfg.output)

    def in_bf16(v: float) -> bool:
        return float(torch.tensor(v, dtype=torch.float32).bfloat16().float()) == v

    losses = [r[k] for r in rows for k in ("loss_retain", "loss_forget")]
    assert all(v > 0 and math.isfinite(v) for v in losses)
    assert not all(in_bf16(v) for v in losses)  # the reductions ran in fp32
    slack = [r["slack"] for r in rows if r.get("slack") is not None]
    assert slack and not all(in_bf16(v) for v in slack)  # lambda's update is computed in fp32


@pytest.mark.parametrize("method,extra", [("eupmu-fast", {}), ("eupmu", {"trajectory_refresh": 3}),
                                          ("ungrad", {"gradient_accumulation_steps": 2})])
def test_resume_matches_an_uninterrupted_run(method, extra, tiny_pipe, make_config, tmp_path):
    straight = make_config(method=method, steps=4, output=str(tmp_path / "a"), lambda_init=0.5, beta=0.01, **extra)
    erase(straight, pipe=copy.deepcopy(tiny_pipe))
    first = make_config(method=method, steps=2, output=str(tmp_path / "b"), lambda_init=0.5, beta=0.01, **extra)
    erase(first, pipe=copy.deepcopy(tiny_pipe))
    second = make_config(method=method, steps=4, output=str(tmp_path / "b"), lambda_init=0.5, beta=0.01,
                         resume="latest", **extra)
    erase(second, pipe=copy.deepcopy(tiny_pipe))
    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for key in ("lambda", "loss_forget", "loss_retain"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-7), (key, ra, rb)
    from safetensors.torch import load_file

    wa, wb = load_file(str(tmp_path / "a" / "erased.safetensors")), load_file(str(tmp_path / "b" / "erased.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


def test_several_concepts_in_one_run(fresh_pipe, make_config):
    cfg = make_config(concepts=["van gogh", "monet"], batch_size=2)
    path = erase(cfg, pipe=fresh_pipe)
    from concept_erase.export.delta import read_delta
    import json

    _, meta = read_delta(path)
    assert json.loads(meta["concepts"]) == ["van gogh", "monet"]


def test_remap_forget_loss_runs(fresh_pipe, make_config):
    before = snapshot(fresh_pipe.unet)
    erase(make_config(forget_loss="remap", remap_to=["a painting"], method="eupmu"), pipe=fresh_pipe)
    assert changed(before, fresh_pipe.unet)


def test_nan_stops_the_run_and_keeps_the_last_checkpoint(fresh_pipe, make_config, monkeypatch):
    from concept_erase.errors import TrainingDiverged

    cfg = make_config(method="eupmu", steps=4, checkpoint_every=2)
    trainer = Trainer(cfg, pipe=fresh_pipe)
    real_losses = Trainer._losses

    def poisoned(self, batch, forget=None):
        out, along, norm_sq = real_losses(self, batch, forget)
        if self.lambda_history and len(self.lambda_history) >= 2:  # from step 3 on
            out = out * float("nan")
        return out, along, norm_sq

    monkeypatch.setattr(Trainer, "_losses", poisoned)
    with pytest.raises(TrainingDiverged, match=r"at step 3.*step-00000002.*intact"):
        trainer.run()
    ckpt = trainer.output / "checkpoints" / "step-00000002"
    assert (ckpt / "trained.safetensors").is_file() and (ckpt / "state.json").is_file()
    assert not (trainer.output / "erased.safetensors").exists()
    assert [r["step"] for r in metrics(cfg.output)] == [1, 2]


def _photo():
    import matplotlib
    from PIL import Image

    from pathlib import Path

    return Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").convert("RGB")


def test_retain_images_with_captions_are_encoded_once(fresh_pipe, make_config, tmp_path):
    folder = tmp_path / "anchors"
    folder.mkdir()
    photo = _photo()
    for i, caption in enumerate(["a portrait photo", "a photo of a woman", "a portrait photo"]):
        photo.rotate(90 * i).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(caption)
    trainer = Trainer(make_config(retain_images=str(folder), anchors=[], method="eupmu"), pipe=fresh_pipe)
    calls = {"n": 0}
    real_encode = fresh_pipe.vae.encode

    def counting(*a, **k):
        calls["n"] += 1
        return real_encode(*a, **k)

    fresh_pipe.vae.encode = counting
    trainer.run()
    bank = trainer.retain.bank
    assert bank.latents.shape == (3, 4, 16, 16)
    assert bank.prompts == ["a photo of a woman", "a portrait photo"]
    assert bank.prompt_index.tolist() == [1, 0, 1]
    assert calls["n"] == 3  # each image once, none per step


def test_retain_images_metadata_errors_name_the_line(tmp_path):
    from concept_erase.training.banks import read_caption_folder
    from concept_erase.errors import UserError

    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n{"file_name": "a.png"}\n')
    with pytest.raises(UserError, match="line 2"):
        read_caption_folder(tmp_path)
    (tmp_path / "metadata.jsonl").unlink()
    with pytest.raises(UserError, match="has no caption"):
        read_caption_folder(tmp_path)


def test_gradient_accumulation_joint_path(fresh_pipe, make_config):
    cfg = make_config(method="eupmu", gradient_accumulation_steps=2, steps=2, lambda_init=0.5, beta=0.01)
    before = snapshot(fresh_pipe.unet)
    erase(cfg, pipe=fresh_pipe)
    assert changed(before, fresh_pipe.unet)
    assert len(metrics(cfg.output)) == 2


def test_a_cached_bank_is_read_and_a_damaged_one_is_regenerated(tmp_path):
    import torch
    from safetensors.torch import save_file

    from concept_erase.training.banks import _cached_latents

    path = tmp_path / "anchor-x.safetensors"
    assert _cached_latents(path) is None  # absent
    latents = torch.arange(6.0).reshape(2, 3)
    save_file({"latents": latents}, str(path))
    assert torch.equal(_cached_latents(path), latents)
    path.write_bytes(path.read_bytes()[:20])  # torn by a crash
    assert _cached_latents(path) is None
