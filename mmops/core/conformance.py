"""``mmops plugins check``: does a plugin honour its contract? A run on small random inputs.

For every plugin, built-in or third-party, it checks what the rest of mmops relies on: output shapes
for batch sizes 1 and N, gradients reaching every trainable parameter (and, for a fusion, every
input), deterministic eval mode, an identical output after a save/load round trip through the real
model artifact, models with 2 and 3 inputs, and a clear ``ValueError`` on a wrong input. The random
inputs come from the plugin's modality, so no data set is needed.
"""

from __future__ import annotations

import io
import json
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mmops.core.interfaces import MODALITIES, Encoder, Fusion, Tokens, as_tokens
from mmops.core.model import MultimodalModel
from mmops.core.plugin_registry import PluginError, discover, get_encoder, get_fusion

BATCH = 4
LABELS = ["no", "yes", "red"]
WORDS = (
    "what",
    "color",
    "is",
    "the",
    "shape",
    "there",
    "a",
    "red",
    "blue",
    "green",
    "circle",
    "triangle",
    "rectangle",
    "in",
    "image",
    "not",
    "does",
    "contain",
)
FUSION_DIMS = {"a": 6, "b": 5, "c": 4}
SEQUENCE_LENGTHS = {"a": 1, "b": 4, "c": 3}  # a sequence-consuming fusion must take unequal lengths
EXTRA_PADDING = 3  # positions appended to check that padding changes nothing


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str = ""


def example_values(modality: str, n: int, rng: np.random.Generator) -> Any:
    """Random raw values of a modality, in the form the prepare stage and the service hand over."""
    if modality == "text":
        return [" ".join(rng.choice(WORDS, rng.integers(1, 8))) + "?" for _ in range(n)]
    if modality == "image":
        return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    if modality == "audio":
        from scipy.io import wavfile

        out = []
        for _ in range(n):  # 8 kHz int16 WAV files: decoding and resampling are exercised too
            buf = io.BytesIO()
            wavfile.write(buf, 8000, (rng.standard_normal(2000) * 3000).astype(np.int16))
            out.append(buf.getvalue())
        return out
    if modality == "tabular":
        return rng.integers(0, 5, (n, 3)).astype(float).tolist()
    if modality == "vectors":  # feature sequences of unequal lengths, 6 features a frame
        return [rng.standard_normal((int(rng.integers(1, 9)), 6)).astype(np.float32) for _ in range(n)]
    raise ValueError(f"no example values for modality '{modality}'")


def wrong_values(modality: str) -> Any:
    """Values an encoder of the modality must refuse with a clear error."""
    return {
        "text": [12, None],
        "image": np.zeros((2, 8, 8), np.uint8),
        "audio": [b"not a wav file"],
        "tabular": [[1.0, 2.0]],
        "vectors": [np.zeros((0, 6), np.float32)],
    }[modality]


def _run(checks: list[Check], name: str, fn: Callable[[], str | None]) -> bool:
    try:
        detail = fn() or ""
    except Exception as exc:  # the point is to report any failure of plugin code, whatever it is
        checks.append(Check(name, False, f"{type(exc).__name__}: {exc}"))
        return False
    checks.append(Check(name, True, detail))
    return True


def _round_trip(spec: dict, encoders: Mapping[str, Encoder], inputs: Mapping[str, Any]) -> None:
    """Save a model through the real artifact format, load it back, compare outputs bit for bit."""
    torch.manual_seed(0)
    model = MultimodalModel(spec, encoders).eval()
    with torch.no_grad():
        before = model(inputs)
    with tempfile.TemporaryDirectory() as tmp:
        model.save(Path(tmp) / "m")
        torch.manual_seed(1)  # a different initialisation: only the loaded weights can make them equal
        loaded = MultimodalModel.load(Path(tmp) / "m")
        with torch.no_grad():
            after = loaded(inputs)
    if not torch.equal(before, after):
        raise AssertionError(f"outputs differ after loading (max diff {(before - after).abs().max():.3g})")


def _spec(inputs: dict[str, tuple[str, str, dict]], fusion: str, fusion_params: dict) -> dict:
    return {
        "candidate": "check",
        "labels": LABELS,
        "image_size": 32,
        "target": "answer",
        "seed": 0,
        "inputs": {n: {"modality": m, "encoder": e, "params": p} for n, (m, e, p) in inputs.items()},
        "fusion": {"name": fusion, "params": fusion_params},
        "head": {"hidden": 8, "dropout": 0.0},
    }


def example_tokens(batch: int, length: int, dim: int, grad: bool = False) -> Tokens:
    """Random tokens whose rows have unequal lengths (row i has ``length - i``, at least one)."""
    values = torch.randn(batch, length, dim, requires_grad=grad)
    lengths = torch.tensor([max(1, length - i) for i in range(batch)])
    return Tokens(values, torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1))


def check_sequence(enc: Encoder, x: Any, b: int) -> Tokens:
    """``forward_sequence``'s contract: Tokens (or a plain 3-D tensor), a (batch, tokens) bool mask, no
    row without a real token (attention over nothing is NaN)."""
    raw = enc.forward_sequence(x)
    if isinstance(raw, Tokens) and (raw.mask.dtype != torch.bool or raw.mask.shape != raw.values.shape[:2]):
        raise AssertionError(
            f"forward_sequence: mask must be bool {tuple(raw.values.shape[:2])}, "
            f"got {raw.mask.dtype} {tuple(raw.mask.shape)}"
        )
    tokens = as_tokens(raw, "forward_sequence")
    if tokens.batch != b or tokens.dim != enc.output_dim:
        raise AssertionError(f"forward_sequence: expected ({b}, T, {enc.output_dim}), got {tuple(tokens.values.shape)}")
    if not tokens.mask.any(1).all():
        raise AssertionError("forward_sequence: a row has no real token (its mask is all False)")
    if not torch.isfinite(tokens.values[tokens.mask]).all():
        raise AssertionError("forward_sequence: real tokens are not finite")
    return tokens


def with_padding(tokens: Tokens, extra: int = EXTRA_PADDING) -> Tokens:
    """The same tokens with ``extra`` positions appended, filled with large random values (padding can hold
    anything), and the existing padding scrambled too."""
    padded = tokens.pad_to(tokens.length + extra)
    noise = torch.randn(padded.values.shape, generator=torch.Generator().manual_seed(7)) * 100
    return Tokens(torch.where(padded.mask.unsqueeze(-1), padded.values, noise), padded.mask)


def assert_padding_invariant(fusion: Fusion, features: Mapping[str, Tokens], what: str) -> None:
    with torch.no_grad():
        before = fusion(features)
        for name in features:
            after = fusion({**features, name: with_padding(features[name])})
            if not torch.allclose(before, after, rtol=1e-4, atol=1e-5):
                raise AssertionError(
                    f"{what}: padding appended to input '{name}' changed the output "
                    f"(max diff {(before - after).abs().max():.3g}): is the mask honoured?"
                )


def padding_invariant(tokens: Tokens) -> list[str]:
    """Every built-in fusion that attends gives the same output on ``tokens`` with padding appended."""
    names = sorted(n for n, info in discover("fusion").items() if info.package == "mmops")
    checked = []
    for name in names:
        cls = get_fusion(name)
        if not cls.needs_sequences:
            continue
        torch.manual_seed(0)
        fusion = cls({"x": tokens.dim, "y": 5}).eval()
        assert_padding_invariant(fusion, {"x": tokens, "y": example_tokens(tokens.batch, 3, 5)}, f"fusion '{name}'")
        checked.append(name)
    return checked


def check_encoder(name: str, params: Mapping[str, Any] | None = None, batch: int = BATCH) -> list[Check]:
    params, checks, rng = dict(params or {}), [], np.random.default_rng(0)
    cls = get_encoder(name)
    modality = getattr(cls, "modality", None)
    if modality not in MODALITIES:
        return [Check("declares a modality", False, f"modality {modality!r} is not one of {MODALITIES}")]
    values = example_values(modality, 16, rng)

    def build() -> Encoder:
        torch.manual_seed(0)
        return cls(**params).fit(values)

    enc: Encoder | None = None

    def builds() -> str:
        nonlocal enc
        enc = build()
        json.dumps(enc.config())
        if not isinstance(enc.output_dim, int) or enc.output_dim < 1:
            raise AssertionError(f"output_dim must be a positive int after fit, got {enc.output_dim!r}")
        return f"{modality}, output_dim {enc.output_dim}, {'frozen' if enc.frozen else 'trainable'}"

    if not _run(checks, "builds, fits on training values, config() is JSON", builds):
        return checks
    assert enc is not None

    def shapes() -> str:
        enc.eval()
        seq = type(enc).forward_sequence is not Encoder.forward_sequence
        lengths = set()
        with torch.no_grad():
            for b in (1, batch):
                x = enc.preprocess(values[:b])
                out = enc(x)
                if tuple(out.shape) != (b, enc.output_dim) or not torch.isfinite(out).all():
                    raise AssertionError(f"batch {b}: expected finite ({b}, {enc.output_dim}), got {tuple(out.shape)}")
                lengths.add(check_sequence(enc, x, b).length)
        return f"and forward_sequence ({'/'.join(map(str, sorted(lengths)))} tokens)" if seq else ""

    _run(checks, f"output shape for batch 1 and {batch}", shapes)

    def padding() -> str:
        enc.eval()
        with torch.no_grad():
            tokens = check_sequence(enc, enc.preprocess(values[:batch]), batch)
        names = padding_invariant(tokens)
        return f"{', '.join(names)} unchanged by {EXTRA_PADDING} appended padding tokens"

    _run(checks, "padding tokens change no built-in attending fusion", padding)

    def gradients() -> str:
        trainable = [(n, p) for n, p in enc.named_parameters() if p.requires_grad]
        if enc.frozen:
            if trainable:
                raise AssertionError(f"frozen, yet {len(trainable)} parameters require grad (its cache would go stale)")
            return "frozen: no trainable parameters, features cacheable"
        if not trainable:
            return "no trainable parameters"
        enc.train()
        out = enc(enc.preprocess(values[:batch]))
        (out * torch.randn_like(out)).sum().backward()
        missing = [n for n, p in trainable if p.grad is None or not torch.isfinite(p.grad).all()]
        if missing:
            raise AssertionError(f"no (finite) gradient for {missing[:5]}")
        return f"{len(trainable)} tensors"

    _run(checks, "gradients reach every trainable parameter", gradients)

    def deterministic() -> None:
        enc.eval()
        with torch.no_grad():
            x = enc.preprocess(values[:batch])
            if not torch.equal(enc(x), enc(x)):
                raise AssertionError("two eval-mode forwards of the same batch differ")

    _run(checks, "eval mode is deterministic", deterministic)

    def round_trip() -> None:
        for k in (2, 3):
            names = [f"x{i}" for i in range(k)]
            encoders = {n: build() for n in names}
            inputs = {n: e.preprocess(values[:batch]) for n, e in encoders.items()}
            _round_trip(_spec({n: (modality, name, params) for n in names}, "concat", {"hidden": 8}), encoders, inputs)

    _run(checks, "save/load round trip gives identical outputs (models with 2 and 3 inputs)", round_trip)

    def wrong_input() -> str:
        try:
            enc(enc.preprocess(wrong_values(modality)))
        except (ValueError, TypeError) as exc:
            if not str(exc):
                raise AssertionError("raised an error with an empty message") from exc
            return str(exc).splitlines()[0][:100]
        raise AssertionError(f"accepted wrong {modality} input without an error")

    _run(checks, "a wrong input gets a clear error", wrong_input)
    return checks


def check_fusion(name: str, params: Mapping[str, Any] | None = None, batch: int = BATCH) -> list[Check]:
    params, checks = dict(params or {}), []
    cls = get_fusion(name)
    info = discover("fusion").get(name)
    origin = f"'{name}' (package {info.origin})" if info else f"'{name}'"
    extra = {"num_classes": len(LABELS)} if cls.produces_logits else {}
    dim_sets = [dict(list(FUSION_DIMS.items())[:k]) for k in (2, 3)]

    def features(dims: Mapping[str, int], b: int, grad: bool = False) -> dict[str, Any]:
        if cls.needs_sequences:
            return {n: example_tokens(b, SEQUENCE_LENGTHS[n], dims[n], grad) for n in dims}
        return {n: torch.randn(b, dims[n], requires_grad=grad) for n in dims}

    def leaf(value: Any) -> torch.Tensor:
        return value.values if isinstance(value, Tokens) else value

    def build(dims: Mapping[str, int], seed: int = 0) -> Fusion:
        torch.manual_seed(seed)
        return cls(dims, **params, **extra)

    fusions: list[Fusion] = []

    def builds() -> str:
        fusions.extend(build(d) for d in dim_sets)
        kinds = [k for k, v in (("sequences", cls.needs_sequences), ("logits", cls.produces_logits)) if v]
        return f"output_dim {fusions[0].output_dim} / {fusions[1].output_dim}" + "".join(f"; {k}" for k in kinds)

    if not _run(checks, "builds with 2 and 3 inputs", builds):
        return checks

    def shapes() -> None:
        for f, dims in zip(fusions, dim_sets, strict=True):
            f.eval()
            with torch.no_grad():
                for b in (1, batch):
                    out = f(features(dims, b))
                    if (
                        not isinstance(out, torch.Tensor)
                        or tuple(out.shape) != (b, f.output_dim)
                        or not torch.isfinite(out).all()
                    ):
                        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                        raise AssertionError(
                            f"fusion {origin}, {len(dims)} inputs, batch {b}: expected finite "
                            f"({b}, {f.output_dim}), got {got}"
                        )

    _run(checks, f"output shape for batch 1 and {batch} (2 and 3 inputs)", shapes)

    def gradients() -> None:
        for f, dims in zip(fusions, dim_sets, strict=True):
            f.train()
            f.zero_grad()
            feats = features(dims, batch, grad=True)
            out = f(feats)
            (out * torch.randn_like(out)).sum().backward()
            missing = [
                n
                for n, p in f.named_parameters()
                if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())
            ]
            if missing:
                raise AssertionError(f"{len(dims)} inputs: no (finite) gradient for {missing[:5]}")
            unused = [n for n, t in feats.items() if leaf(t).grad is None or not leaf(t).grad.abs().sum()]
            if unused:
                raise AssertionError(f"{len(dims)} inputs: the output does not depend on input(s) {unused}")

    _run(checks, "gradients reach every trainable parameter and every input", gradients)

    def deterministic() -> None:
        for f, dims in zip(fusions, dim_sets, strict=True):
            f.eval()
            feats = features(dims, batch)
            with torch.no_grad():
                if not torch.equal(f(feats), f(feats)):
                    raise AssertionError(f"{len(dims)} inputs: two eval-mode forwards differ")

    _run(checks, "eval mode is deterministic", deterministic)

    if cls.needs_sequences:

        def padding() -> None:
            for f, dims in zip(fusions, dim_sets, strict=True):
                assert_padding_invariant(f.eval(), features(dims, batch), f"{len(dims)} inputs")

        _run(checks, f"{EXTRA_PADDING} appended padding tokens do not change the output", padding)

    def round_trip() -> None:
        for f, dims in zip(fusions, dim_sets, strict=True):
            feats = features(dims, batch)
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "fusion.safetensors"
                save_file({k: v.contiguous() for k, v in f.state_dict().items()}, str(path))
                fresh = build(dims, seed=1).eval()
                fresh.load_state_dict(load_file(str(path)))
            with torch.no_grad():
                if not torch.equal(f.eval()(feats), fresh(feats)):
                    raise AssertionError(f"{len(dims)} inputs: outputs differ after loading the state dict")
        # Inside a real model: a trainable CNN (a sequence of positions) and numeric inputs (one token).
        rng = np.random.default_rng(0)
        images, table = example_values("image", batch, rng), example_values("tabular", 16, rng)
        for k in (2, 3):
            inputs = {
                "a": ("image", "cnn_image", {"channels": [4, 8]}),
                "b": ("tabular", "numeric", {"hidden": 8}),
                "c": ("tabular", "numeric", {"hidden": 6}),
            }
            inputs = dict(list(inputs.items())[:k])
            encoders = {n: get_encoder(e)(**p) for n, (_, e, p) in inputs.items()}
            for n in ("b", "c")[: k - 1]:
                encoders[n].fit(table)
            raw = {"a": images, "b": table[:batch], "c": table[:batch]}
            _round_trip(_spec(inputs, name, params), encoders, {n: e.preprocess(raw[n]) for n, e in encoders.items()})

    _run(
        checks, "save/load round trip gives identical outputs (state dict, and a model with 2 and 3 inputs)", round_trip
    )

    def wrong_input() -> str:
        f, dims = fusions[0], dim_sets[0]
        feats = features(dims, batch)
        messages = []
        wide = example_tokens(batch, 2, 99) if cls.needs_sequences else torch.randn(batch, 99)
        for bad in ({"a": feats["a"]}, {**feats, "a": wide}):
            try:
                f(bad)
            except (ValueError, TypeError) as exc:
                messages.append(str(exc))
                continue
            shapes = {k: tuple(leaf(v).shape) for k, v in bad.items()}
            raise AssertionError(f"accepted inputs {shapes} without an error")
        return messages[-1][:100]

    _run(checks, "a wrong input (missing, wrong width) gets a clear error", wrong_input)
    return checks


def learns_xor(name: str, params: Mapping[str, Any] | None = None, steps: int = 300, seed: int = 0) -> Check:
    """Does the fusion, under the model's default head, learn y = a XOR b from two inputs?

    Each input carries one bit as a noisy random code (a sequence of 3 noisy copies for fusions that
    attend); neither input alone says anything about y, so a fusion that drops one input, saturates, or
    cannot mix them stays near 50%. Trained full-batch with Adam, judged on fresh examples."""
    what = "learns a two-input function (XOR of one bit per input, each alone useless)"
    try:
        cls = get_fusion(name)
    except PluginError as exc:
        return Check(what, False, str(exc))
    torch.manual_seed(seed)
    dims = {"a": 8, "b": 8}
    codes = {n: torch.randn(2, d) for n, d in dims.items()}

    def sample(n: int) -> tuple[dict[str, Any], torch.Tensor]:
        bits = torch.randint(0, 2, (n, 2))
        feats: dict[str, Any] = {}
        for i, (k, d) in enumerate(dims.items()):
            if cls.needs_sequences:
                values = codes[k][bits[:, i]].unsqueeze(1) + 0.3 * torch.randn(n, 3, d)
                feats[k] = Tokens(values, torch.ones(n, 3, dtype=torch.bool))
            else:
                feats[k] = codes[k][bits[:, i]] + 0.3 * torch.randn(n, d)
        return feats, bits[:, 0] ^ bits[:, 1]

    try:
        fusion = cls(dims, **dict(params or {}), **({"num_classes": 2} if cls.produces_logits else {}))
        head = (
            torch.nn.Identity()
            if cls.produces_logits
            else torch.nn.Sequential(torch.nn.Linear(fusion.output_dim, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))
        )
        model = torch.nn.ModuleDict({"fusion": fusion, "head": head})
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        train, target = sample(256)
        model.train()
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(head(fusion(train)), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        test, truth = sample(512)
        with torch.no_grad():
            accuracy = float((head(fusion(test)).argmax(1) == truth).float().mean())
    except Exception as exc:  # plugin code: any failure is this check failing, with its reason
        return Check(what, False, f"{type(exc).__name__}: {exc}")
    detail = f"accuracy {accuracy:.2f} on fresh examples after {steps} steps (chance 0.50; pass at 0.90)"
    return Check(what, accuracy >= 0.9, detail)


def plugin_kind(name: str) -> str:
    kinds = [k for k in ("encoder", "fusion", "task") if name in discover(k)]
    if not kinds:
        known = sorted({*discover("encoder"), *discover("fusion"), *discover("task")})
        raise PluginError(f"no plugin named '{name}'. Installed: {', '.join(known)}")
    if len(kinds) > 1:
        raise PluginError(f"'{name}' is more than one kind of plugin ({', '.join(kinds)}): choose one with --kind")
    return kinds[0]


def check_plugin(
    name: str, kind: str | None = None, params: Mapping[str, Any] | None = None, learn: bool = False
) -> list[Check]:
    """Run every check; a plugin that cannot even be loaded is one failed check, not an exception.
    ``learn``: a fusion must also learn a XOR of its two inputs (:func:`learns_xor`, a few seconds)."""
    try:
        kind = kind or plugin_kind(name)
        checker = {"encoder": check_encoder, "fusion": check_fusion, "task": check_task}[kind]
        checks = checker(name, params)
        if learn and kind == "fusion":
            checks.append(learns_xor(name, params))
        return checks
    except PluginError as exc:
        return [Check("loads through its entry point", False, str(exc))]


def check_task(name: str, params: Mapping[str, Any] | None = None, batch: int = BATCH) -> list[Check]:
    """A task on its own example targets and a random fused vector: everything training, selection and
    the service call, in the order they call it."""
    from mmops.core.plugin_registry import get_task
    from mmops.core.tasks import HIGHER, LOWER, build_task

    checks: list[Check] = []
    cls = get_task(name)
    checks.append(Check("loads through its entry point", True))
    state: dict[str, Any] = {}

    def directions() -> str | None:
        metrics = dict(getattr(cls, "metrics", {}) or {})
        if not metrics:
            raise AssertionError("declares no metrics (class attribute `metrics = {name: 'max' | 'min'}`)")
        wrong = {k: v for k, v in metrics.items() if v not in (HIGHER, LOWER)}
        if wrong:
            raise AssertionError(f"metric directions must be 'max' or 'min', got {wrong}")
        return None

    def targets() -> str | None:
        probe = build_task(name, dict(params or {}))
        cells = list(cls.example_targets)
        parsed = [probe.parse(c) for c in cells]
        labels = probe.vocabulary(parsed)
        index = {label: i for i, label in enumerate(labels)}
        stored = [probe.encode(v, index) for v in parsed]
        task = build_task(name, dict(params or {}), labels)
        task.fit(task.targets(stored))
        json.dumps(task.config())
        state.update(task=task, labels=labels, stored=stored)
        return None

    def loss() -> str | None:
        task = state["task"]
        torch.manual_seed(0)
        rows = len(state["stored"])
        names = cls.example_inputs  # the inputs its network takes (a contrastive task's two towers)
        if cls.combines_inputs:  # its own network takes the inputs by name: token sequences if it asks
            head = task.network(dict.fromkeys(names, 8), 16, 0.0)
            features = (
                torch.randn(rows, 3, 8, requires_grad=True)
                if cls.needs_sequences
                else torch.randn(rows, 8, requires_grad=True)
            )
            outputs = head(dict.fromkeys(names, Tokens.full(features) if cls.needs_sequences else features))
        else:
            head = task.head(8, 16, 0.0)
            features = torch.randn(rows, 8, requires_grad=True)
            outputs = head(features)
        value = task.loss(outputs, task.targets(state["stored"]))
        if value.dim() != 0 or not torch.isfinite(value):
            raise AssertionError(f"loss must be a finite scalar, got {value}")
        value.backward()
        if features.grad is None or not torch.isfinite(features.grad).all() or features.grad.abs().sum() == 0:
            raise AssertionError("the loss does not send gradients back to the fused vector")
        if cls.combines_inputs:  # outputs may hold the network itself (a decoder): run it again without grad
            with torch.no_grad():
                given = Tokens.full(features) if cls.needs_sequences else features
                state["outputs"] = head(dict.fromkeys(names, given))
        else:
            state["outputs"] = outputs.detach()
        return None

    def judged() -> str | None:
        task, outputs = state["task"], state["outputs"]
        scores = task.scores(outputs).numpy()
        metrics = task.evaluate(task.targets(state["stored"]), scores)
        missing = [m for m in cls.metrics if not isinstance(metrics.get(m), int | float)]
        if missing:
            raise AssertionError(
                f"evaluate() must report every declared metric as a number; missing or not numeric: {missing}"
            )
        described = task.describe(task.targets(state["stored"]), scores, metrics)
        columns = {"target", "prediction", "confidence", "correct", "error"}
        if set(described) != columns or any(len(v) != len(scores) for v in described.values()):
            raise AssertionError(
                f"describe() must give one value per row for exactly {sorted(columns)}, got {sorted(described)}"
            )
        return None

    def answers() -> str | None:
        task, outputs = state["task"], state["outputs"]
        out = task.answers(task.scores(outputs), 2)
        if len(out) != len(outputs) or not all(isinstance(a, dict) and {"answer", "top_k"} <= set(a) for a in out):
            raise AssertionError("answers() must give one dict per row with at least 'answer' and 'top_k'")
        json.dumps(out)
        state["answers"] = out
        return None

    def round_trip() -> str | None:
        task = state["task"]
        again = build_task(name, json.loads(json.dumps(task.config())), state["labels"])
        if again.answers(again.scores(state["outputs"]), 2) != state["answers"]:
            raise AssertionError(
                "a task rebuilt from config() answers differently: config() must carry all learned state"
            )
        return None

    def combined() -> str | None:
        task, outputs = state["task"], state["outputs"]
        scores = task.scores(task.combine([outputs, outputs, outputs]))
        if scores.shape != task.scores(outputs).shape or not torch.allclose(
            scores, task.scores(outputs), rtol=1e-4, atol=1e-5
        ):
            raise AssertionError("combine() of three identical members must score as that member (train.ensemble)")
        return None

    _run(checks, "metrics declare their direction", directions)
    if _run(checks, "targets parse, encode and fit (example_targets)", targets) and _run(
        checks, "loss is a finite scalar with gradients", loss
    ):
        _run(checks, "scores give every declared metric and the predictions columns", judged)
        if _run(checks, "outputs decode to JSON answers", answers):
            _run(checks, "config() round-trips (save/load)", round_trip)
        if cls.combines_models():  # optional: a task without combine() cannot be a deep ensemble, nothing more
            _run(checks, "combine() of identical members scores as one (train.ensemble)", combined)
    return checks
