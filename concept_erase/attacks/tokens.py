"""Prompt tokens an attack optimises: distributions over a vocabulary, and slots in the text encoders.

Pure parts (tested without a model):

- `project_to_simplex`: the Euclidean projection of each row onto the probability simplex, restricted
  to the allowed tokens (Duchi et al. 2008, the sort-based form: exact, vectorised, no bisection).
- `straight_through`: the one-hot rows of sampled tokens in the forward pass, the gradient passed to
  the distributions unchanged (UnlearnDiffAtk's estimator: tokens are drawn from the rows, the
  gradient with respect to the one-hot rows is the gradient with respect to the distributions).

`TokenSlots` puts K consecutive tokens in front of a prompt in every text encoder of a pipeline,
whose embeddings are set from outside (a distribution times the embedding matrix, or free vectors).
The prompt carries K copies of a marker word; each encoder's input-embedding layer gets a forward
hook that replaces the marker rows. The pipeline's own `encode_prompt` (and so every family's `encode`)
then encodes prompts with the slots, gradients flowing into what fills them. Why hooks and not a
copy of each encoder's forward: the families encode through the pipelines' own code (CLIP's, T5's,
the pooled projections), which stays the one path for training, sampling and attacking.
"""

from __future__ import annotations

import contextlib

import torch

MARKER = "x"  # one token in the CLIP BPE vocabulary and in T5's; only its K copies in front are replaced

PROMPT_ARGUMENTS = {"tokenizer": "prompt", "tokenizer_2": "prompt_2", "tokenizer_3": "prompt_3"}
ENCODERS = {"tokenizer": "text_encoder", "tokenizer_2": "text_encoder_2", "tokenizer_3": "text_encoder_3"}


def project_to_simplex(v: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Each row of `v` [K, V] projected onto {p >= 0, sum p = 1}, with p = 0 outside `allowed` [V] (bool)."""
    v = v.float()
    if allowed is not None:
        # far enough below every allowed entry never to enter the support (theta >= max - 1)
        low = v[:, allowed].min(dim=1, keepdim=True).values - 2.0
        v = torch.where(allowed, v, low)
    u, _ = torch.sort(v, dim=1, descending=True)
    css = u.cumsum(dim=1) - 1.0
    k = torch.arange(1, v.shape[1] + 1, device=v.device, dtype=v.dtype)
    support = (u - css / k) > 0
    rho = support.float().cumsum(dim=1).argmax(dim=1, keepdim=True)  # the last index in the support
    theta = css.gather(1, rho) / (rho + 1).to(v.dtype)
    p = (v - theta).clamp(min=0)
    if allowed is not None:
        p = p * allowed
    return p


def straight_through(probs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """One-hot rows of `tokens` [K] in the forward pass; the gradient flows to `probs` [K, V] as if the
    one-hot rows were the distributions."""
    hard = torch.nn.functional.one_hot(tokens, probs.shape[-1]).to(probs.dtype)
    return hard + (probs - probs.detach())  # exactly the one-hot rows: p - p is 0, (1 + p) - p need not be 1


def sample_tokens(probs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One token per row, drawn from the row's distribution (on the CPU generator: reproducible)."""
    return torch.multinomial(probs.detach().float().cpu(), 1, generator=gen).squeeze(1).to(probs.device)


class Slot:
    """One tokenizer/encoder pair of the pipeline: where its K marker tokens sit and its embedding layer."""

    def __init__(self, tokenizer_name: str, tokenizer, encoder, k: int):
        self.tokenizer_name, self.tokenizer, self.encoder, self.k = tokenizer_name, tokenizer, encoder, k
        self.prompt_argument = PROMPT_ARGUMENTS[tokenizer_name]
        self.embedding = encoder.get_input_embeddings()
        # the layers that look tokens up in that matrix: T5's encoder calls its own `embed_tokens`, tied to the
        # model's `shared` that get_input_embeddings returns
        self.lookups = [m for m in encoder.modules()
                        if isinstance(m, torch.nn.Embedding) and m.weight is self.embedding.weight]
        marker = tokenizer(MARKER, add_special_tokens=False).input_ids
        if len(marker) != 1:
            raise RuntimeError(f"the marker {MARKER!r} is {len(marker)} tokens for {tokenizer_name}")
        self.marker_id = marker[0]
        ids = tokenizer(" ".join([MARKER] * k) + " a", add_special_tokens=True).input_ids
        run = [self.marker_id] * k
        self.start = next((i for i in range(len(ids) - k + 1) if ids[i:i + k] == run), None)
        if self.start is None:
            raise RuntimeError(f"{tokenizer_name} does not keep {k} marker tokens in a row")
        self.fill: torch.Tensor | None = None  # [K, D] while set

    @property
    def vocab_size(self) -> int:
        return min(int(self.embedding.weight.shape[0]), len(self.tokenizer))

    def allowed(self) -> torch.Tensor:
        """Tokens an adversarial prompt may use: the vocabulary less the special tokens (start, end, padding)."""
        mask = torch.ones(self.vocab_size, dtype=torch.bool)
        for i in self.tokenizer.all_special_ids:
            if 0 <= i < self.vocab_size:
                mask[i] = False
        return mask

    def hook(self, module, inputs, output):
        if self.fill is None:
            return output
        ids = inputs[0]
        rows = (ids[:, self.start:self.start + self.k] == self.marker_id).all(dim=1)
        if not bool(rows.any()):
            return output
        output = output.clone()
        output[rows, self.start:self.start + self.k] = self.fill.to(output.dtype)
        return output


def pipeline_slots(pipe, k: int) -> list[Slot]:
    """A slot for every tokenizer with its text encoder in the pipeline (SD: one; SDXL: two CLIPs; SD3: two
    CLIPs and T5; FLUX: CLIP and T5)."""
    out = []
    for tok_name, enc_name in ENCODERS.items():
        tok, enc = getattr(pipe, tok_name, None), getattr(pipe, enc_name, None)
        if tok is not None and enc is not None:
            out.append(Slot(tok_name, tok, enc, k))
    return out


def vocabulary_groups(slots: list[Slot]) -> list[list[Slot]]:
    """Slots whose tokenizers share one vocabulary (SDXL's and SD3's two CLIPs) in one group: one
    distribution, one text. T5's vocabulary is a group of its own."""
    groups: list[list[Slot]] = []
    for s in slots:
        for g in groups:
            if g[0].vocab_size == s.vocab_size and g[0].tokenizer.get_vocab() == s.tokenizer.get_vocab():
                g.append(s)
                break
        else:
            groups.append([s])
    return groups


def slotted(prompt: str, k: int) -> str:
    """The prompt with K marker tokens in front: what the encoders read while slots are filled."""
    return " ".join([MARKER] * k) + " " + prompt


@contextlib.contextmanager
def installed(slots: list[Slot]):
    """The slots' hooks on their embedding layers for the duration; removed (and emptied) afterwards."""
    handles = [m.register_forward_hook(s.hook) for s in slots for m in s.lookups]
    try:
        yield slots
    finally:
        for h in handles:
            h.remove()
        for s in slots:
            s.fill = None
