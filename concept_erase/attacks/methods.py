"""The attacks: `none`, `unlearndiff` and `textual-inversion`, each registered by name (`ATTACKS`).

Both optimising attacks minimise the same loss, the erased model's denoising loss on images of the
concept that the base model draws (the "diffusion classifier" of UnlearnDiffAtk: a prompt under which
the erased model denoises the concept's images well is a prompt that brings the concept back):

    L(c) = E_n || f_erased(x_t(x0, n, t), t, c) - target(x0, n, t) ||^2

with the family's own noising and target (epsilon or v for SD and SDXL, the velocity for SD3 and FLUX).
They differ in what `c` may be:

- `unlearndiff` (Zhang et al., ECCV 2024): K real tokens in front of the prompt, each a distribution over
  the vocabulary; one token per row is drawn, its one-hot row enters the text encoder, the gradient goes
  to the distribution (straight-through), Adam (lr 0.01, weight decay 0.1) takes a step and the rows are
  projected back onto the simplex. The timesteps are taken in turn, low noise first (the middles of
  `--timesteps` equal bins); after each one's `--iterations` steps the rows' most likely tokens are
  decoded to text, the erased model draws that text, and the attack stops at the first success. Per
  prompt, as the paper attacks. Prompts the erased model already draws the concept for count as
  successes without an attack, as in the paper.
- `textual-inversion` (the idea of Pham et al., "Circumventing Concept Erasure Methods For Text-to-Image
  Generative Models", ICLR 2024): K free embedding vectors in front of the prompt, in every text encoder,
  learnt once on all the prompts' base images (Adam, lr 5e-3, `--iterations` x `--timesteps` steps at
  random timesteps drawn as in training), then each prompt is drawn with them. The vectors are saved in
  the form diffusers' `load_textual_inversion` reads.

Where a pipeline's encoders read different vocabularies (T5 beside CLIP in SD3 and FLUX), each vocabulary
has its own K tokens and its own text, given to the pipeline as `prompt_2`/`prompt_3`.
"""

from __future__ import annotations

import contextlib

import torch

from concept_erase.attacks.ring_a_bell import (POPULATION, STRENGTH, allowed_ids, clip_tokenizer, concept_vector,
                                               default_pairs, genetic_search, prompt_tokens, without)
from concept_erase.attacks.tokens import (installed, pipeline_slots, project_to_simplex, sample_tokens, slotted,
                                          straight_through, vocabulary_groups)
from concept_erase.registry import Registry

ATTACKS: Registry = Registry("attack", "--attack")


def denoising_loss(ctx, x0: torch.Tensor, t: torch.Tensor, cond, gen: torch.Generator) -> torch.Tensor:
    """The erased model's denoising loss on x0 at timestep t under the conditioning (fresh noise from gen)."""
    noise = torch.randn(x0.shape, generator=gen).to(x0.device, x0.dtype)
    x_t = ctx.schedule.noised(x0, noise, t)
    pred = ctx.family.predict(ctx.denoiser, x_t.to(ctx.dtype), t, cond.to(dtype=ctx.dtype))
    return torch.nn.functional.mse_loss(pred.float(), ctx.schedule.target(x0, noise, t).float())


class Attack:
    name = ""
    learns = True  # whether it optimises anything (every attack but `none`)
    attacks_every_prompt = False  # whether it also attacks prompts the erased model draws the concept for
    reads = ("tokens", "iterations", "timesteps")  # the attack settings it uses; giving another is refused

    @classmethod
    def auto_settings(cls, shipped: bool) -> dict:
        """Defaults of its own, where they differ from the optimising attacks' (`shipped`: on a small model shipped in
        the package)."""
        return {}

    def __init__(self, options: dict):
        self.options = options
        self.k = int(options["tokens"])

    def prepare(self, ctx, targets: list) -> dict:
        """Work shared by all prompts (textual inversion learns its vectors here); returns what to record."""
        return {}

    def attack(self, ctx, target) -> dict:
        """Attack one prompt whose original drawing did not show the concept; returns its record."""
        raise NotImplementedError


@ATTACKS.register("none")
class NoAttack(Attack):
    name = "none"
    learns = False
    reads = ()

    def attack(self, ctx, target):
        return {"success": False, "rounds": []}


@ATTACKS.register("unlearndiff")
class UnlearnDiff(Attack):
    name = "unlearndiff"
    lr, weight_decay = 0.01, 0.1  # the paper's (its configs' text_grad settings)

    def attack(self, ctx, target):
        slots = pipeline_slots(ctx.pipe, self.k)
        groups = vocabulary_groups(slots)
        allowed = [g[0].allowed().to(ctx.device) for g in groups]
        probs = [project_to_simplex(torch.full((self.k, len(a)), 1.0 / len(a), device=ctx.device), a)
                 .requires_grad_(True) for a in allowed]
        opt = torch.optim.Adam(probs, lr=self.lr, weight_decay=self.weight_decay)
        gen = torch.Generator().manual_seed(int(target.seed))
        x0 = ctx.target_latents(target)
        text = slotted(target.prompt, self.k)
        rounds = []
        with installed(slots):
            for r, t in enumerate(ctx.schedule.spread(int(self.options["timesteps"]))):
                t = t.reshape(1).to(ctx.device)
                losses = []
                for _ in range(int(self.options["iterations"])):
                    opt.zero_grad(set_to_none=True)
                    for g, p in zip(groups, probs):
                        st = straight_through(p, sample_tokens(p, gen))
                        for s in g:
                            s.fill = st @ s.embedding.weight[: p.shape[1]].to(st.dtype)
                    cond = ctx.family.encode(ctx.pipe, [text], ctx.device, ctx.resolution)
                    loss = denoising_loss(ctx, x0, t, cond, gen)
                    loss.backward()
                    opt.step()
                    with torch.no_grad():
                        for p, a in zip(probs, allowed):
                            p.copy_(project_to_simplex(p, a))
                    losses.append(float(loss.detach()))
                prompts = self.decoded(groups, probs, target.prompt)
                for s in slots:
                    s.fill = None  # the decoded text is drawn as any user's prompt is
                image = ctx.render(prompts, target.seed)
                verdict = ctx.judge([image])[0]
                rounds.append({"round": r, "timestep": float(t), "losses": [round(x, 6) for x in losses],
                               "prompt": prompts["prompt"], **({"prompts": prompts} if len(prompts) > 1 else {}),
                               "success": verdict["success"], "label": verdict["label"]})
                if verdict["success"]:
                    break
        last = rounds[-1]
        return {"success": last["success"], "adversarial_prompt": last["prompt"],
                **({"adversarial_prompts": last["prompts"]} if "prompts" in last else {}),
                "image": image, "rounds": rounds}

    def decoded(self, groups, probs, prompt: str) -> dict:
        """Each vocabulary's most likely tokens as text in front of the prompt, under the pipeline argument
        that gives its encoders their text."""
        out = {}
        for g, p in zip(groups, probs):
            ids = p.detach().argmax(dim=1).tolist()
            words = g[0].tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()
            for s in g:
                out[s.prompt_argument] = f"{words} {prompt}"
        return out


@ATTACKS.register("textual-inversion")
class TextualInversion(Attack):
    name = "textual-inversion"
    lr = 5e-3  # diffusers' textual_inversion example's learning rate

    def prepare(self, ctx, targets):
        slots = pipeline_slots(ctx.pipe, self.k)
        self.slots = slots
        gen = torch.Generator().manual_seed(0)
        vectors = []
        for s in slots:  # start from the concept's own first token in each vocabulary
            first = s.tokenizer(ctx.concept, add_special_tokens=False).input_ids[:1] or [s.marker_id]
            w = s.embedding.weight.detach()
            vectors.append(w[first * self.k].clone().float().requires_grad_(True))
        opt = torch.optim.Adam(vectors, lr=self.lr)
        latents = [ctx.target_latents(t) for t in targets]
        texts = [slotted(t.prompt, self.k) for t in targets]
        steps = int(self.options["iterations"]) * int(self.options["timesteps"])
        losses = []
        with installed(slots):
            for step in range(steps):
                i = int(torch.randint(len(targets), (1,), generator=gen))
                opt.zero_grad(set_to_none=True)
                for s, v in zip(slots, vectors):
                    s.fill = v
                cond = ctx.family.encode(ctx.pipe, [texts[i]], ctx.device, ctx.resolution)
                t = ctx.schedule.sample_timesteps(1, gen).to(ctx.device)
                loss = denoising_loss(ctx, latents[i], t, cond, gen)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
        self.vectors = [v.detach() for v in vectors]
        ctx.save_embedding(self.embedding_file())
        n = max(len(losses) // 10, 1)
        return {"steps": steps, "loss_first": sum(losses[:n]) / n, "loss_last": sum(losses[-n:]) / n,
                "embedding": "embedding.safetensors"}

    def embedding_file(self) -> dict[str, torch.Tensor]:
        """The vectors in the form diffusers' `load_textual_inversion` reads: `emb_params` [K, D] for one text
        encoder; `clip_l`, `clip_g`, `t5` (one tensor per encoder) for several, as SDXL embeddings are shared."""
        if len(self.slots) == 1:
            return {"emb_params": self.vectors[0].cpu().contiguous()}
        out, clips = {}, 0
        for s, v in zip(self.slots, self.vectors):
            if "T5" in type(s.encoder).__name__:
                key = "t5"
            else:
                key = ("clip_l", "clip_g")[min(clips, 1)]
                clips += 1
            out[key] = v.cpu().contiguous()
        return out

    def attack(self, ctx, target):
        with installed(self.slots):
            for s, v in zip(self.slots, self.vectors):
                s.fill = v
            image = ctx.render({"prompt": slotted(target.prompt, self.k)}, target.seed)
            verdict = ctx.judge([image])[0]
        return {"success": verdict["success"], "adversarial_prompt": f"<embedding.safetensors x{self.k}> {target.prompt}",
                "image": image, "label": verdict["label"], "rounds": []}


@contextlib.contextmanager
def quiet_truncation():
    """The search decodes each candidate's tokens to text for the pipeline to encode; a candidate that encodes to more
    tokens than the window is cut as its drawing will be, and diffusers and transformers would say so for every one
    of the thousands of candidates. Their warnings are silenced for the search and restored after."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    before = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(before[0])
        transformers_logging.set_verbosity(before[1])


@ATTACKS.register("ring-a-bell")
class RingABell(Attack):
    """Ring-A-Bell (`attacks/ring_a_bell.py`): the concept vector from prompt pairs, then per prompt a genetic search
    for a K-token prompt whose text embedding is the prompt's, less the concept's words, plus the vector."""

    name = "ring-a-bell"
    attacks_every_prompt = True  # it never reads the erased model: every prompt is attacked
    reads = ("tokens", "iterations", "pairs")  # one search per prompt: no timesteps

    @classmethod
    def auto_settings(cls, shipped: bool) -> dict:
        return {"tokens": 16, "iterations": 100 if shipped else 3000, "timesteps": 1}

    @torch.no_grad()
    def embed(self, ctx, prompts: list[str]) -> torch.Tensor:
        return ctx.family.encode(ctx.pipe, list(prompts), ctx.device, ctx.resolution).tensors[
            "encoder_hidden_states"].float()

    @torch.no_grad()
    def prepare(self, ctx, targets):
        self.tokenizer = clip_tokenizer(ctx.pipe)
        self.k = prompt_tokens(self.k, self.tokenizer)
        given = self.options.get("pairs")
        pairs = [tuple(p) for p in given] if given else default_pairs(ctx.concept, [t.prompt for t in targets])
        self.vector = concept_vector(lambda prompts: self.embed(ctx, prompts), pairs)
        return {"pairs": len(pairs), "strength": STRENGTH, "population": POPULATION,
                "generations": int(self.options["iterations"]), "prompt_tokens": self.k}

    @torch.no_grad()
    def attack(self, ctx, target):
        tokenizer = self.tokenizer
        goal = self.embed(ctx, [without(target.prompt, ctx.concept)])[0] + STRENGTH * self.vector

        def text(ids) -> str:
            return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()

        def fitness(ids: torch.Tensor) -> torch.Tensor:
            e = self.embed(ctx, [text(row) for row in ids.tolist()])
            return (e - goal).square().mean(dim=(1, 2)).cpu()

        gen = torch.Generator().manual_seed(int(target.seed))
        with quiet_truncation():
            ids, distance, history = genetic_search(fitness, allowed_ids(tokenizer), self.k,
                                                    int(self.options["iterations"]), gen)
        prompt = text(ids.tolist())
        image = ctx.render({"prompt": prompt}, target.seed)
        verdict = ctx.judge([image])[0]
        return {"success": verdict["success"], "adversarial_prompt": prompt, "image": image, "label": verdict["label"],
                "rounds": [{"generations": len(history) - 1, "distance_first": round(history[0], 6),
                            "distance_last": round(distance, 6)}]}
