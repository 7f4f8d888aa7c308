"""The negative-guidance objective's options, checked against the models directly."""

import pytest
import torch

from concept_erase.errors import UserError
from concept_erase.training.trainer import Trainer, step_generator


def _forget(pipe, make_config, **settings):
    trainer = Trainer(make_config(**settings), pipe=pipe)
    trainer._setup()
    return trainer


def test_relative_to_replaces_the_empty_prompt_in_the_target(fresh_pipe, make_config):
    """With eta 0 the target is exactly the original model's prediction for the reference prompt."""
    trainer = _forget(fresh_pipe, make_config, eta=0.0, relative_to=["a painting"], sampling_steps=4)
    batch = trainer.forget.batch(step_generator(0, 0, 0, 0), 2, 0)
    ref = trainer.ctx.embed(["a painting"]).repeat(2)
    with torch.no_grad():
        expected = trainer.ctx.original(batch.latents, batch.timesteps, ref).float()
    torch.testing.assert_close(batch.target, expected)
    empty = trainer.ctx.embed([""]).repeat(2)
    with torch.no_grad():
        assert not torch.allclose(batch.target, trainer.ctx.original(batch.latents, batch.timesteps, empty).float())


def test_several_timesteps_from_one_trajectory(fresh_pipe, make_config):
    """trajectory_timesteps r: batch_size / r trajectories, each read at r distinct timesteps; the rows
    of one trajectory are linked by sampling (denoising the earlier row reaches the later one)."""
    trainer = _forget(fresh_pipe, make_config, batch_size=2, trajectory_timesteps=2, trajectory_refresh=1,
                      sampling_steps=6)
    forget = trainer.forget
    batch = forget.batch(step_generator(0, 3, 0, 0), 2, 3)
    assert len(batch) == 2 and batch.timesteps[0] != batch.timesteps[1]
    index = {int(t): i for i, t in enumerate(forget.timesteps)}
    k = [index[int(t)] for t in batch.timesteps]
    early, late = (0, 1) if k[0] < k[1] else (1, 0)
    x = forget._denoise(batch.latents[early:early + 1], batch.cond[early:early + 1], k[early], k[late])
    torch.testing.assert_close(x, batch.latents[late:late + 1], rtol=1e-4, atol=1e-5)


def test_the_preservation_loss_targets_the_original_models_prediction(fresh_pipe, make_config):
    """--retain-loss preservation: the target is the original model's prediction on the same noised anchor, so
    the loss is 0 before training and grows once the trained weights move."""
    from concept_erase.methods.losses import per_sample_mse

    trainer = _forget(fresh_pipe, make_config, retain_loss="preservation")
    batch = trainer.retain.batch(step_generator(0, 0, 0, 1), 4, 0)
    predict = lambda: trainer.ctx.current(batch.latents, batch.timesteps, batch.cond).float()  # noqa: E731
    with torch.no_grad():
        assert float(per_sample_mse(predict(), batch.target).mean()) < 1e-10
        for p in trainer.trained.values():
            p.add_(0.05 * torch.randn_like(p))
        assert float(per_sample_mse(predict(), batch.target).mean()) > 1e-6
    denoising = _forget(fresh_pipe, make_config, retain_loss="denoising").retain.batch(step_generator(0, 0, 0, 1), 4, 0)
    assert not torch.allclose(denoising.target, batch.target)  # the noise, not the prediction


@pytest.mark.parametrize("settings,message", [
    (dict(trajectory_timesteps=2, trajectory_refresh=1, batch_size=3), "must divide --batch-size"),
    (dict(trajectory_timesteps=2, batch_size=2), "applies to fresh trajectories"),  # the default pool
    (dict(trajectory_timesteps=2, batch_size=2, trajectory_refresh=5), "applies to fresh trajectories"),
    (dict(relative_to=["a", "b", "c"], concepts=["x", "y"]), "one --relative-to for all concepts"),
    (dict(relative_to=["a"], forget_loss="remap", remap_to=["b"]), "negative-guidance only"),
    (dict(slack_probe="sideways"), "--slack-probe 'sideways' is not one of"),
])
def test_bad_objective_settings(settings, message, make_config):
    with pytest.raises(UserError, match=message):
        make_config(**settings)
