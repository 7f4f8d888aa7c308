"""What differs between model families, behind one small interface.

The trainer, the lambda controllers, the objectives and the losses know no family: they hold a
`Family` and ask it to encode prompts, call the denoiser, noise latents and give the training target,
sample the negative-guidance trajectory, and name the trainable subsets. A family is registered by
name and found from the pipeline's class (`model_index.json`'s `_class_name`).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from concept_erase.errors import UserError
from concept_erase.registry import Registry


class Cond:
    """A batch of prompt conditionings: named tensors, the batch in dim 0.

    SD's is the text encoder's hidden states; SDXL adds the pooled embedding and the time ids. Objectives
    index, repeat and concatenate conditionings without knowing what is in them.
    """

    def __init__(self, **tensors: torch.Tensor):
        if not tensors:
            raise ValueError("a conditioning needs at least one tensor")
        sizes = {v.shape[0] for v in tensors.values()}
        if len(sizes) != 1:
            raise ValueError(f"a conditioning's tensors disagree on the batch size: {sizes}")
        self.tensors = dict(tensors)

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def __getitem__(self, index) -> "Cond":
        if isinstance(index, int):
            index = slice(index, index + 1)
        if isinstance(index, torch.Tensor):
            return Cond(**{k: v[index.to(v.device)] for k, v in self.tensors.items()})
        return Cond(**{k: v[index] for k, v in self.tensors.items()})

    def __eq__(self, other) -> bool:
        return (isinstance(other, Cond) and self.tensors.keys() == other.tensors.keys()
                and all(torch.equal(v, other.tensors[k]) for k, v in self.tensors.items()))

    def repeat(self, n: int) -> "Cond":
        """A one-item conditioning repeated n times."""
        if len(self) != 1:
            raise ValueError("only a single conditioning can be repeated")
        return Cond(**{k: v.expand(n, *v.shape[1:]) for k, v in self.tensors.items()})

    @staticmethod
    def cat(conds: Iterable["Cond"]) -> "Cond":
        conds = list(conds)
        return Cond(**{k: torch.cat([c.tensors[k] for c in conds]) for k in conds[0].tensors})

    def to(self, device=None, dtype=None) -> "Cond":
        """Floating-point tensors cast to dtype; every tensor moved to device."""
        return Cond(**{k: v.to(device=device, dtype=dtype if v.is_floating_point() else None)
                       for k, v in self.tensors.items()})

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.{k}": v.contiguous() for k, v in self.tensors.items()}

    @staticmethod
    def from_state(tensors: dict[str, torch.Tensor], prefix: str, device) -> "Cond":
        head = prefix + "."
        return Cond(**{k[len(head):]: v.to(device) for k, v in tensors.items() if k.startswith(head)})


class NoiseSchedule:
    """Training's noising: a timestep per sample, the noised latents, the target of the denoiser."""

    prediction_type = "epsilon"

    def sample_timesteps(self, n: int, gen: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def ordered(self, index: torch.Tensor) -> torch.Tensor:
        """The training timesteps at these positions, counted from the least noise to the most."""
        raise NotImplementedError

    def spread(self, n: int) -> torch.Tensor:
        """n training timesteps, the middles of n equal bins from the least noise to the most
        (UnlearnDiffAtk's schedule: 10, 30, ..., 990 for n = 50 of 1000)."""
        width = max(len(self) // n, 1)
        index = torch.tensor([min(width // 2 + k * width, len(self) - 1) for k in range(n)])
        return self.ordered(index)


class Family:
    """One model family. Subclasses fill in what their pipelines need."""

    name = ""
    pipeline_classes: tuple[str, ...] = ()
    subsets: dict[str, Callable[[str], bool]] = {}
    lora_targets: list[str] = []
    load_kwargs: dict = {}  # extra from_pretrained / from_single_file arguments
    required_parts: tuple[str, ...] = ()  # what a pipeline must hold to be erased from
    denoiser_name = "unet"  # the pipeline component (and folder) that holds the denoiser
    denoiser_class = "UNet2DConditionModel"
    part_names: dict[str, str] = {}  # how an error names a missing part, where its attribute says little
    lora_layers_argument = "unet_lora_layers"  # the pipeline's save_lora_weights names the denoiser's layers so
    fp16_refusal = ""  # why the family cannot train under fp16 autocast ("" when it can)
    kohya_lora = False  # whether its LoRA is written in kohya's form (lora_unet_* keys), the default where it is
    single_file_layout = False  # whether `export --format single-file` writes it (`single_file` below)
    uses_negative_prompt = True  # sampled with classifier-free guidance, where a negative prompt takes the empty one's place

    # ------------------------------------------------------------ the model
    def denoiser(self, pipe) -> torch.nn.Module:
        raise NotImplementedError

    def text_encoders(self, pipe) -> list[torch.nn.Module]:
        raise NotImplementedError

    def native_resolution(self, pipe) -> int:
        raise NotImplementedError

    def latent_shape(self, pipe, resolution: int) -> tuple[int, ...]:
        """One sample's latents as the denoiser and the pipeline's `latents=` take them."""
        raise NotImplementedError

    def max_resolution(self, pipe) -> int | None:
        """The largest side the denoiser can take (None: no limit but memory)."""
        return None

    def resolution_step(self, pipe) -> int:
        """Image sides must be a multiple of this many pixels."""
        raise NotImplementedError

    def initial_noise(self, pipe, seeds: list[int], resolution: int) -> torch.Tensor:
        """The starting latents of one image per seed, each drawn from its own seeded generator on the CPU:
        the same image for the same seed on any device and in any batch."""
        shape = self.latent_shape(pipe, resolution)
        return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])

    def generation_kwargs(self, pipe, resolution: int) -> dict:
        """What a pipeline call needs besides the prompts, the latents and the steps."""
        return {"height": resolution, "width": resolution}

    @torch.no_grad()
    def image_latents(self, pipe, images: torch.Tensor) -> torch.Tensor:
        """Latents of images in [-1, 1] (the VAE posterior's mean), in the denoiser's space."""
        vae = pipe.vae
        z = vae.encode(images.to(vae.device, vae.dtype)).latent_dist.mean
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (z - shift) * vae.config.scaling_factor

    # ------------------------------------------------------------ prompts and the denoiser call
    def encode(self, pipe, prompts: list[str], device, resolution: int) -> Cond:
        raise NotImplementedError

    def inputs(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> tuple[tuple, dict]:
        """(args, kwargs) of the denoiser call: the same for the model being trained and for
        `functional_call` on the original weights."""
        raise NotImplementedError

    def predict(self, model, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        args, kwargs = self.inputs(x, t, cond)
        return model(*args, **kwargs).sample

    def guided(self, model, x: torch.Tensor, t: torch.Tensor, cond: Cond, uncond: Cond, scale: float) -> torch.Tensor:
        """The prediction a pipeline samples with at guidance `scale`: classifier-free guidance,
        `u + scale (c - u)`, from one call on the doubled batch. `model(x, t, cond)` is a prediction."""
        out = model(torch.cat([x, x]), torch.cat([t, t]), Cond.cat([uncond, cond])).float()
        u, c = out.chunk(2)
        return u + scale * (c - u)

    # ------------------------------------------------------------ closed-form edits (UCE)
    edit_subset = ""  # what a closed-form edit changes, as the delta and the model card name it

    def edit_layers(self, model: torch.nn.Module) -> dict[str, str]:
        """{module name: the conditioning tensor it reads}: the linear layers that read the text encoders'
        output directly, which a closed-form edit may solve for."""
        raise UserError(f"the {self.name} family has no closed-form edit here; use a trained --method")

    def token_streams(self, pipe) -> list[tuple]:
        """(tokenizer, first position, token count) of each text stream in `encoder_hidden_states`."""
        raise NotImplementedError

    @torch.no_grad()
    def text_tokens(self, pipe, prompts: list[str], device) -> tuple[dict[str, torch.Tensor], list[list[tuple]]]:
        """(the prompts' conditioning tensors, by name; of each prompt, per text stream, (the position of its last
        token before the end token, the stream's end) in the token sequence). A stream whose encoder is absent is
        left out."""
        cond = self.encode(pipe, list(prompts), device, self.native_resolution(pipe)).tensors
        spans: list[list[tuple]] = [[] for _ in prompts]
        for tokenizer, start, length in self.token_streams(pipe):
            for i, prompt in enumerate(prompts):
                n = len(tokenizer(prompt, truncation=True, max_length=length).input_ids)
                spans[i].append((start + max(n - 2, 0), start + length))
        return cond, spans

    # ------------------------------------------------------------ noise, targets, trajectories
    def schedule(self, pipe) -> "NoiseSchedule":
        """How training noises latents and what the denoiser should output for them."""
        raise NotImplementedError

    def sampler(self, pipe, steps: int, resolution: int):
        """The negative-guidance trajectory's sampler at `steps` steps: `timesteps`, `init_noise_sigma`,
        and `step(output, i, x)`, the latents after sampling step i."""
        raise NotImplementedError

    # ------------------------------------------------------------ exports
    def single_file(self, pipe) -> dict[str, torch.Tensor]:
        """The whole pipeline as one checkpoint in the family's original layout, checked by diffusers'
        own readers before it is returned."""
        raise UserError(f"the {self.name} family has no single-file layout here; export with --format diffusers")

    # ------------------------------------------------------------ subsets
    def subset_names(self, model: torch.nn.Module, subset: str) -> set[str]:
        """The names of the denoiser's parameters a subset trains."""
        return {n for n, _ in model.named_parameters() if self.in_subset(n, subset)}

    def in_subset(self, name: str, subset: str) -> bool:
        if subset not in self.subsets:
            raise UserError(f"--train {subset}: the {self.name} family has no such subset; choose one of "
                            f"{', '.join(sorted(self.subsets))} or lora")
        return self.subsets[subset](name)


# every family registers itself from its module, imported the first time the table is read
FAMILIES: Registry[type] = Registry("model family", "--model", providers=(
    "concept_erase.families.sd", "concept_erase.families.sdxl", "concept_erase.families.sd3",
    "concept_erase.families.flux"))


def family_for_class(class_name: str) -> Family:
    """The family that handles a pipeline class, or a one-line error naming those that are handled."""
    for name in FAMILIES.names():
        family = FAMILIES.get(name)
        if class_name in family.pipeline_classes:
            return family()
    handled = sorted(c for n in FAMILIES.names() for c in FAMILIES.get(n).pipeline_classes)
    raise UserError(f"this model is a {class_name}, which no family of concept-erase handles; the pipelines it "
                    f"handles are {', '.join(handled)}")


def family_of(pipe) -> Family:
    return family_for_class(type(pipe).__name__)
