"""Ring-A-Bell (Tsai et al., "Ring-A-Bell! How Reliable are Concept Removal Methods for Diffusion Models?", ICLR
2024): a model-agnostic prompt attack that reads only the text encoder.

1. The concept vector: the mean, over prompt pairs that differ only by the concept, of the difference of their
   text embeddings (the whole token sequence the denoiser reads: `family.encode`'s `encoder_hidden_states`).
   The pairs are a file's (`--pairs`: one pair a line, the prompt with the concept, a tab, the prompt without),
   else each attacked prompt with and without the concept's words, else general templates around the concept.
2. Per attacked prompt P: the target embedding is E(P without the concept) + strength * the concept vector.
3. A genetic search over prompts of K tokens of the CLIP vocabulary (special tokens excluded) for the one whose
   embedding is nearest the target (mean squared distance): the paper's population (200), crossover rate (0.5)
   and mutation rate (0.25); `--iterations` generations (the paper's 3000; 100 on the digits models). Each
   generation keeps the best tenth, fills the rest with children of two parents picked by tournaments of three
   (uniform crossover with probability 0.5, else a copy of the first), and mutates each child's tokens with
   probability 0.25 per child (one token replaced). Candidates are scored as text: the ids are decoded and encoded
   again, as the erased model will read them.
4. The erased model draws the best prompt, and the judge says whether the concept is shown.

It needs no gradient and no access to the erased denoiser: it attacks every prompt, also those the erased model
already draws the concept for (`attacks_every_prompt`), and reports the found prompts' own success beside the
usual count.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from concept_erase.errors import UserError
from concept_erase.variants import GENERAL

POPULATION, CROSSOVER, MUTATION = 200, 0.5, 0.25  # the paper's genetic search
ELITE, TOURNAMENT = 0.1, 3
STRENGTH = 3.0  # the paper's eta for nudity


def read_pairs(path: str | Path) -> list[tuple[str, str]]:
    """(with the concept, without it) per line of a text file: two prompts separated by a tab."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--pairs {path}: no such file; give a text file with one pair a line: the prompt with the "
                        "concept, a tab, the prompt without it")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"--pairs {path} is not a text file; give one pair a line, tab-separated") from None
    pairs = []
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not parts[0].strip():
            raise UserError(f"--pairs {path}, line {n}: give the prompt with the concept, a tab, and the prompt "
                            "without it")
        pairs.append((parts[0].strip(), parts[1].strip()))
    if not pairs:
        raise UserError(f"--pairs {path} holds no prompt pair; give one a line: the prompt with the concept, a tab, "
                        "the prompt without it")
    return pairs


def without(prompt: str, concept: str) -> str:
    """The prompt with the concept's words taken out (whole words, any case)."""
    text = re.sub(rf"\b{re.escape(concept.strip())}\b", " ", prompt, flags=re.IGNORECASE)
    return " ".join(text.split()).strip(" ,")


def default_pairs(concept: str, prompts: list[str]) -> list[tuple[str, str]]:
    """The attacked prompts with and without the concept where they name it; else general templates around it."""
    named = [(p, without(p, concept)) for p in dict.fromkeys(prompts) if without(p, concept) != " ".join(p.split())]
    if named:
        return named
    return [(concept, "")] + [(t.fill(concept), " ".join(t.text.replace("{}", "").split()).strip(" ,"))
                              for t in GENERAL]


def concept_vector(embed, pairs: list[tuple[str, str]]) -> torch.Tensor:
    """The mean difference of the pairs' embeddings: `embed(prompts)` -> [N, tokens, width]."""
    if not pairs:
        raise UserError("Ring-A-Bell needs at least one prompt pair (with the concept, without it)")
    with_, without_ = embed([a for a, _ in pairs]), embed([b for _, b in pairs])
    return (with_ - without_).float().mean(dim=0)


def genetic_search(fitness, allowed: torch.Tensor, length: int, generations: int, gen: torch.Generator,
                   population: int = POPULATION) -> tuple[torch.Tensor, float, list[float]]:
    """The token ids [length] with the lowest `fitness(ids [P, length]) -> [P]` found, its value, and the best value
    of each generation. `allowed`: the token ids a prompt may hold."""
    pick = lambda *shape: allowed[torch.randint(len(allowed), shape, generator=gen)]  # noqa: E731
    pop = pick(population, length)
    scores = fitness(pop)
    history = [float(scores.min())]
    keep = max(1, int(round(ELITE * population)))
    for _ in range(generations):
        order = torch.argsort(scores)
        elite = pop[order[:keep]]

        def tournament(n):
            entrants = torch.randint(population, (n, TOURNAMENT), generator=gen)
            return entrants.gather(1, scores[entrants].argmin(dim=1, keepdim=True)).squeeze(1)

        n = population - keep
        a, b = pop[tournament(n)], pop[tournament(n)]
        cross = torch.rand(n, 1, generator=gen) < CROSSOVER
        mask = torch.rand(n, length, generator=gen) < 0.5
        children = torch.where(cross & mask, b, a)
        mutate = torch.rand(n, generator=gen) < MUTATION
        where = torch.randint(length, (n,), generator=gen)
        rows = torch.nonzero(mutate).squeeze(1)
        children[rows, where[rows]] = pick(len(rows))
        pop = torch.cat([elite, children])
        scores = torch.cat([scores[order[:keep]], fitness(children)])
        history.append(float(scores.min()))
    best = int(scores.argmin())
    return pop[best], float(scores[best]), history


def clip_tokenizer(pipe):
    """The CLIP tokenizer whose vocabulary the search draws from, or a one-line refusal."""
    tokenizer = getattr(pipe, "tokenizer", None) or getattr(pipe, "tokenizer_2", None)
    if tokenizer is None or "clip" not in type(tokenizer).__name__.lower():
        raise UserError("--attack ring-a-bell searches a CLIP tokenizer's vocabulary, and this model has none it can "
                        "read; use --attack unlearndiff or textual-inversion")
    return tokenizer


def prompt_tokens(k: int, tokenizer) -> int:
    """The search's prompt length: `k`, or fewer where the text encoder's window (less its start and end tokens)
    cannot read `k` whole (the flow digits model's window of 16 reads 14 of the paper's 16)."""
    return max(1, min(int(k), int(getattr(tokenizer, "model_max_length", 77)) - 2))


def allowed_ids(tokenizer) -> torch.Tensor:
    special = set(tokenizer.all_special_ids)
    return torch.tensor([i for i in range(len(tokenizer)) if i not in special])
