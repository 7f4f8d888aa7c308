"""What the flow-matching transformer families (SD3, FLUX.1) share: rectified-flow noising, the velocity
target, Euler trajectories, and the subsets of a joint-attention transformer.

Noising and target (`FlowMatchSchedule`), as SD3 and FLUX were trained:
    x_s = (1 - s) x0 + s n,   target v = n - x0,   s = t / 1000 in (0, 1].
The training timestep is drawn as diffusers' own SD3 and FLUX training scripts draw it
(`train_dreambooth_lora_sd3.py`, `train_dreambooth_lora_flux.py`, weighting "logit_normal"): u from a
logit-normal(0, 1), then the `int(u * 1000)`-th entry of the model scheduler's training sigmas (shifted
by the scheduler's `shift` for SD3; FLUX's scheduler shifts by resolution at sampling time only, so its
training sigmas are unshifted). The denoiser's prediction is the velocity; the negative-guidance target
`v0 - eta (vc - v0)` is exact in velocity space (the weights 1 + eta and -eta sum to one).

Trajectories (`EulerSampler`): the Euler steps of `FlowMatchEulerDiscreteScheduler` on the sigmas the
model's pipeline samples with (for FLUX, shifted by `mu` for the image's token count, as `FluxPipeline`
does), written as the one-line update `x + (s_next - s) v` so that a trajectory can start again at any
step: diffusers' scheduler keeps an internal step counter that a partial or restarted trajectory would
leave wrong.
"""

from __future__ import annotations

import torch

from concept_erase.families.base import Family, NoiseSchedule
from concept_erase.families.noising import flow_noised, flow_target
from concept_erase.io.single_file import transformer_single_file


class FlowMatchSchedule(NoiseSchedule):
    prediction_type = "flow"

    def __init__(self, scheduler_config):
        from diffusers import FlowMatchEulerDiscreteScheduler

        sched = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        self.train_timesteps = int(sched.config.num_train_timesteps)
        self.timesteps = sched.timesteps.float().clone()  # 1000 entries, sigma x 1000, high to low

    def __len__(self) -> int:
        return len(self.timesteps)

    def ordered(self, index: torch.Tensor) -> torch.Tensor:
        return self.timesteps.flip(0)[index.long()]  # the table runs from the most noise to the least

    def sample_timesteps(self, n: int, gen: torch.Generator) -> torch.Tensor:
        u = torch.sigmoid(torch.randn((n,), generator=gen))  # logit-normal(0, 1)
        index = (u * len(self.timesteps)).long().clamp(max=len(self.timesteps) - 1)
        return self.timesteps[index]

    def sigma(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return (t.float() / self.train_timesteps).to(like.device)

    def noised(self, x0, noise, t):
        return flow_noised(x0, noise, self.sigma(t, x0))

    def target(self, x0, noise, t):
        return flow_target(x0, noise)


class EulerSampler:
    """A flow-matching trajectory's steps, by index: `step(v, i, x)` goes from sigma_i to sigma_{i+1}."""

    init_noise_sigma = 1.0

    def __init__(self, scheduler_config, steps: int, mu: float | None = None):
        import numpy as np
        from diffusers import FlowMatchEulerDiscreteScheduler

        sched = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        if sched.config.get("use_dynamic_shifting", False):
            sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps).tolist(), mu=mu)
        else:
            sched.set_timesteps(steps)
        self.timesteps = sched.timesteps.float().clone()
        self.sigmas = sched.sigmas.float().clone()  # one more than the timesteps: the last is 0

    def step(self, velocity: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        return (x.float() + (self.sigmas[i + 1] - self.sigmas[i]) * velocity.float()).to(x.dtype)


# The text stream's attention projections of the joint (MM-DiT) blocks: where the prompt enters the image.
TEXT_ATTENTION = (".attn.add_q_proj.", ".attn.add_k_proj.", ".attn.add_v_proj.", ".attn.to_add_out.")


def _xattn(name: str) -> bool:
    return name.startswith("transformer_blocks.") and any(p in name for p in TEXT_ATTENTION)


class TransformerFamily(Family):
    """A flow-matching MM-DiT (SD3, FLUX.1). Its subsets:

    - `xattn`: in every joint block (`transformer_blocks.N`), the text stream's attention projections
      `attn.add_q_proj`, `attn.add_k_proj`, `attn.add_v_proj` and `attn.to_add_out` (weights and
      biases). Joint attention has no separate cross-attention: these four are where the prompt's tokens
      are turned into queries, keys and values beside the image's, and written back to the text stream.
      (SD3's last block discards its text stream: its `add_q_proj` feeds nothing and is left out.)
    - `xattn-kv`: `add_k_proj` and `add_v_proj` only: the text keys and values (UCE's and MACE's choice on UNets).
    - `noxattn`: every weight but `xattn`'s, the time/text embedding (`time_text_embed`), the text input
      projection (`context_embedder`) and the output layers (`norm_out`, `proj_out`): ESD-u's idea.
    - `full`: every weight.
    - `lora`: PEFT LoRA on the four `xattn` projections (EraseAnything++ trains `add_q_proj` and `add_k_proj`).
    There is no `selfattn`: in joint attention the image's queries attend to text and image at once.
    """

    subsets = {
        "full": lambda n: True,
        "xattn": _xattn,
        "xattn-kv": lambda n: n.startswith("transformer_blocks.") and (".attn.add_k_proj." in n or ".attn.add_v_proj." in n),
        "noxattn": lambda n: not (_xattn(n) or n.startswith(("time_text_embed.", "context_embedder.", "norm_out.",
                                                               "proj_out."))),
    }
    lora_targets = ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
    lora_layers_argument = "transformer_lora_layers"
    denoiser_name = "transformer"

    t5_tokenizer, t5_default = "", 256  # the pipeline's T5 tokenizer and its max_sequence_length default

    single_file_layout = True  # the transformer alone, in Stability AI's (SD3) or Black Forest Labs' (FLUX.1) layout

    # A closed-form edit changes the projections that read the text encoders' output as it is: the token sequence's
    # `context_embedder` and the pooled embedding's `time_text_embed.text_embedder.linear_1`. The joint blocks'
    # add_k/add_v projections read the text stream after earlier blocks (and the time step's modulation), not the
    # encoders' output, so their inputs are not the prompt's embeddings.
    edit_subset = "text-in"

    def denoiser(self, pipe):
        return pipe.transformer

    def edit_layers(self, model) -> dict[str, str]:
        layers = {"context_embedder": "encoder_hidden_states",
                  "time_text_embed.text_embedder.linear_1": "pooled_projections"}
        modules = dict(model.named_modules())
        return {n: source for n, source in layers.items() if isinstance(modules.get(n), torch.nn.Linear)}

    def single_file(self, pipe):
        return transformer_single_file(self.name, pipe.transformer)

    def t5_length(self, pipe) -> int:
        """T5's token count: the pipeline's default, or fewer where the T5 tokenizer says so (a small model
        trained on short captions); the same at training (`encode`) and at sampling (`generation_kwargs`)."""
        tokenizer = getattr(pipe, self.t5_tokenizer, None)
        return min(self.t5_default, int(getattr(tokenizer, "model_max_length", self.t5_default) or self.t5_default))

    def generation_kwargs(self, pipe, resolution: int) -> dict:
        return {**super().generation_kwargs(pipe, resolution), "max_sequence_length": self.t5_length(pipe)}

    def schedule(self, pipe) -> FlowMatchSchedule:
        return FlowMatchSchedule(pipe.scheduler.config)

    def sampler(self, pipe, steps: int, resolution: int) -> EulerSampler:
        return EulerSampler(pipe.scheduler.config, steps)
