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


def test_the_prompt_order_holds_every_prompt_once_in_each_block_and_keeps_no_state():
    """Numbered over calls, then slots (processes x micro-batches), then rows, each aligned block of `count` draws
    is every prompt once; a fresh order (a resumed run) draws the same; another seed, another order."""
    from concept_erase.methods.objectives import PromptOrder

    count, slots, n = 5, 2, 2
    order = PromptOrder(count, seed=3)
    drawn = {}
    for call in range(10):
        for slot in range(slots):
            for j, p in enumerate(order.picks(call, (slot, slots), n)):
                drawn[(call * slots + slot) * n + j] = int(p)
    assert sorted(drawn) == list(range(40))
    for block in range(8):
        assert sorted(drawn[block * count + i] for i in range(count)) == list(range(count))
    assert [int(p) for p in PromptOrder(count, seed=3).picks(7, (1, slots), n)] == [drawn[30], drawn[31]]
    other = PromptOrder(count, seed=4)
    assert [int(p) for c in range(10) for p in other.picks(c, (0, 1), 4)] != \
        [int(p) for c in range(10) for p in order.picks(c, (0, 1), 4)]


def test_the_prompt_order_draws_each_prompt_its_repeats_in_every_block_and_once_each_by_default():
    """With repeats, each aligned block holds prompt i repeats[i] times; with none, every prompt once and the same
    draws as an order built with ones (a stored run's draws do not change)."""
    from concept_erase.methods.objectives import PromptOrder

    repeats = [1, 1, 3]
    order = PromptOrder(3, seed=3, repeats=repeats)
    assert order.count == 5
    drawn = [int(p) for call in range(20) for p in order.picks(call, (0, 1), 2)]
    for block in range(8):
        assert sorted(drawn[5 * block:5 * block + 5]) == [0, 1, 2, 2, 2]
    plain = [int(p) for c in range(6) for p in PromptOrder(4, seed=3).picks(c, (0, 1), 2)]
    assert plain == [int(p) for c in range(6) for p in PromptOrder(4, seed=3, repeats=[1] * 4).picks(c, (0, 1), 2)]
    with pytest.raises(ValueError, match="one repeat of at least 1 per prompt"):
        PromptOrder(3, seed=0, repeats=[1, 0, 1])


def test_a_run_of_several_concepts_draws_each_equally_often(fresh_pipe, make_config, monkeypatch):
    """Three concepts over twelve forget draws (six steps, two micro-batches): every three draws in a row hold each
    concept once, and each row's conditioning is its concept's."""
    from concept_erase.methods.objectives import NegativeGuidance

    trainer = _forget(fresh_pipe, make_config, concepts=["van gogh", "monet", "a cat"], batch_size=1,
                      gradient_accumulation_steps=2, steps=3, trajectory_refresh=1, trajectory_timesteps=1)
    forget, drawn = trainer.forget, []
    real_which, real_batch = NegativeGuidance._which, NegativeGuidance.batch

    def which(self, *args, **kwargs):
        drawn.append(real_which(self, *args, **kwargs))
        return drawn[-1]

    def batch(self, *args, **kwargs):
        out = real_batch(self, *args, **kwargs)
        expected = self.concepts[drawn[-1]].tensors["encoder_hidden_states"]
        assert torch.equal(out.cond.tensors["encoder_hidden_states"], expected)
        return out

    monkeypatch.setattr(NegativeGuidance, "_which", which)
    monkeypatch.setattr(NegativeGuidance, "batch", batch)
    for step in range(6):
        for micro in range(2):
            trainer._forget_batch(step_generator(0, step, 0, micro), step, 0, micro)
    order = [int(k) for w in drawn for k in w]
    assert [sorted(order[i:i + 3]) for i in range(0, 12, 3)] == [[0, 1, 2]] * 4
    assert len(forget.concepts) == 3


def test_the_remap_loss_draws_its_prompts_equally_often(fresh_pipe, make_config):
    """--forget-loss remap with two concepts: every two draws hold each concept's prompt once (read from the rows'
    conditioning, marked with the prompt's number)."""
    from concept_erase.families.base import Cond

    trainer = _forget(fresh_pipe, make_config, concepts=["van gogh", "monet"], forget_loss="remap",
                      remap_to=["a painting"], method="fixed", batch_size=1)
    forget = trainer.forget
    hidden = forget.cond.tensors["encoder_hidden_states"]
    forget.cond = Cond(encoder_hidden_states=torch.arange(len(hidden)).float()[:, None, None].expand_as(hidden))
    drawn = [int(forget.batch(step_generator(0, step, 0, 0), 1, step).cond.tensors["encoder_hidden_states"][0, 0, 0])
             for step in range(8)]
    assert [sorted(drawn[i:i + 2]) for i in range(0, 8, 2)] == [[0, 1]] * 4
