"""``mmops adapt``: batch-norm statistics re-estimated on a new domain's unlabelled inputs (AdaBN).

A tiny audio project (tones of three pitches, 8 kHz) is trained once; the "new domain" is the same
tones sung higher, quieter and noisier. The statistics are checked against ones computed here by hand
from the encoder's own preprocessing, so the test fails if adaptation reads other rows, skips a layer
or leaves the training statistics in place.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from scipy.io import wavfile
from typer.testing import CliRunner

from mmops.adapt import (
    ADAPTATION_FILE,
    PSEUDO_FILE,
    AdaptError,
    adapt_artifact,
    adaptable_norms,
    pseudo_labels,
    reestimating,
)
from mmops.cli.main import app
from mmops.core.model import WEIGHTS_FILE, Ensemble, MultimodalModel, load_model
from mmops.data.audio import load_audio
from mmops.data.featurize import featurize
from mmops.data.prepare import prepare
from mmops.pipeline import train_one, write_metrics
from mmops.project import Project
from mmops.serving.predictor import Predictor

RATE, SECONDS = 8000, 0.5
PITCHES = {"low": 300.0, "mid": 700.0, "high": 1500.0}
runner = CliRunner()


def tone(hz: float, seed: int, gain: float = 0.3, noise: float = 0.01) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(round(RATE * SECONDS * rng.uniform(0.6, 1.0))) / RATE
    wave = sum(np.sin(2 * np.pi * hz * k * t) / k for k in (1, 2, 3))
    wave = gain * wave / 1.9 + noise * rng.standard_normal(len(t))
    return (np.clip(wave, -1, 1) * 32767).astype(np.int16)


def write_rows(folder: Path, n: int, shift: float = 1.0, gain: float = 0.3, noise: float = 0.01, seed: int = 0):
    """``n`` clips per pitch in ``folder/audio/`` and their manifest rows (audio, label)."""
    (folder / "audio").mkdir(parents=True, exist_ok=True)
    rows = []
    for label, hz in PITCHES.items():
        for i in range(n):
            name = f"audio/{label}_{seed}_{i}.wav"
            wavfile.write(folder / name, RATE, tone(hz * shift, seed * 1000 + i, gain, noise))
            rows.append({"audio": name, "label": label})
    return rows


def make_project(root: Path, train: dict | None = None) -> Project:
    raw = root / "data" / "raw"
    pd.DataFrame(write_rows(raw, 30)).to_csv(raw / "manifest.csv", index=False)
    params = {
        "data": {"source": "manifest", "sample_rate": RATE, "audio_seconds": SECONDS},
        "inputs": {"audio": {"modality": "audio", "params": {"sample_rate": RATE, "channels": [16, 16]}}},
        "target": "label",
        "train": {"epochs": 15, "patience": 15, "batch_size": 16, "lr": 0.01, "head_hidden": 16, "threads": 1}
        | (train or {}),
        "candidates": [{"name": "tones", "inputs": ["audio"]}],
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    project = Project.at(root)
    project.state_dir.mkdir(exist_ok=True)
    prepare(raw, project.prepared_dir, project.params)
    featurize(project.prepared_dir, project.features_dir, project.params)
    result = train_one(project, project.params.candidates[0])
    assert result["status"] == "completed", result
    write_metrics(project, [result], result)
    return project


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Project:
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MMOPS_DB_URL", raising=False)
        return make_project(tmp_path_factory.mktemp("adapt"))


@pytest.fixture
def new_domain(tmp_path) -> Path:
    """Four clips per pitch, sung 20% higher, ten times quieter and noisier: a new voice and microphone."""
    rows = write_rows(tmp_path / "site", 4, shift=1.2, gain=0.03, noise=0.003, seed=7)
    manifest = tmp_path / "site" / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


def expected_first_norm(model: MultimodalModel, manifest: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The input batch-norm's statistics over the manifest's clips, from the encoder's own preprocessing:
    one batch, so AdaBN's cumulative mean is that batch's mean and unbiased variance over clips and frames."""
    encoder = model.encoders["audio"].eval()
    files = pd.read_csv(manifest)["audio"]
    waves = [load_audio((manifest.parent / f).read_bytes(), RATE, SECONDS) for f in files]
    x = encoder.preprocess(waves).flatten(1, 2)  # (clips, bands, frames): what the TDNN's first norm sees
    return x.mean(dim=(0, 2)), x.transpose(0, 1).reshape(x.shape[1], -1).var(dim=1, unbiased=True)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_adapt_reestimates_the_statistics_on_the_new_rows_only(project, new_domain, tmp_path):
    source = project.models_dir / "tones"
    before = digest(source / WEIGHTS_FILE)
    out = tmp_path / "adapted"
    summary = adapt_artifact(source, new_domain, out, target="label", batch_size=64)
    assert summary["rows"] == 12 and summary["refused"] == [] and summary["members"] == 1
    assert summary["layers"] == len(adaptable_norms(MultimodalModel.load(source))) >= 3
    assert summary["before"]["rows"] == summary["after"]["rows"] == 12
    assert 0.0 <= summary["after"]["accuracy"] <= 1.0
    assert json.loads((out / ADAPTATION_FILE).read_text())["manifest_sha256"] == digest(new_domain)
    assert digest(source / WEIGHTS_FILE) == before  # the source artifact is never touched

    adapted, original = MultimodalModel.load(out), MultimodalModel.load(source)
    norm = adapted.encoders["audio"].features[0]
    mean, var = expected_first_norm(adapted, new_domain)
    assert torch.allclose(norm.running_mean, mean, atol=1e-4)
    assert torch.allclose(norm.running_var, var, rtol=1e-3, atol=1e-4)
    # Only statistics moved: every learned weight is the source's.
    learned = dict(original.named_parameters())
    assert all(torch.equal(p, learned[n]) for n, p in adapted.named_parameters())
    old = dict(original.named_buffers())
    changed = [n for n, b in adapted.named_buffers() if "running_" in n and not torch.equal(b, old[n])]
    assert len(changed) == 2 * summary["layers"]


def test_bad_rows_are_refused_by_line_and_the_others_adapt(project, new_domain, tmp_path):
    (new_domain.parent / "audio" / "corrupt.wav").write_bytes(b"RIFF not really a wave file")
    (tmp_path / "outside.wav").write_bytes((new_domain.parent / "audio").joinpath("low_7_0.wav").read_bytes())
    rows = pd.read_csv(new_domain)
    bad = pd.DataFrame(
        {
            "audio": ["audio/missing.wav", "../outside.wav", "audio/corrupt.wav", ""],
            "label": ["low", "low", "mid", "high"],
        }
    )
    pd.concat([rows, bad]).to_csv(new_domain, index=False)
    summary = adapt_artifact(project.models_dir / "tones", new_domain, tmp_path / "out", target="label")
    assert summary["rows"] == len(rows)
    refused = {p["line"]: p for p in summary["refused"]}
    first = len(rows) + 2  # the header is line 1
    assert sorted(refused) == [first, first + 1, first + 2, first + 3]
    assert all(p["field"] == "audio" for p in refused.values())
    assert "not found" in refused[first]["reason"]
    assert "escapes the data root" in refused[first + 1]["reason"]
    assert "WAV" in refused[first + 2]["reason"] or "wav" in refused[first + 2]["reason"].lower()
    assert "required" in refused[first + 3]["reason"]

    bad.to_csv(new_domain, index=False)
    with pytest.raises(AdaptError, match=r"no usable rows .*line 2, audio"):
        adapt_artifact(project.models_dir / "tones", new_domain, tmp_path / "none")
    assert not (tmp_path / "none").exists()
    pd.DataFrame({"sound": ["audio/low_7_0.wav"]}).to_csv(new_domain, index=False)
    with pytest.raises(AdaptError, match="no column 'audio'"):
        adapt_artifact(project.models_dir / "tones", new_domain, tmp_path / "none")


def test_unknown_labels_are_not_scored_and_unlabelled_rows_still_adapt(project, new_domain, tmp_path):
    rows = pd.read_csv(new_domain)
    rows.loc[0, "label"] = "whistle"  # a class the model never learned
    rows.loc[1, "label"] = None
    rows.to_csv(new_domain, index=False)
    summary = adapt_artifact(project.models_dir / "tones", new_domain, tmp_path / "out", target="label")
    assert summary["rows"] == 12
    assert summary["after"]["rows"] == 10 and summary["after"]["unknown_targets"] == 1
    unlabelled = adapt_artifact(project.models_dir / "tones", new_domain, tmp_path / "out2")
    assert "before" not in unlabelled and unlabelled["rows"] == 12


def test_a_model_without_batch_norm_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("MMOPS_DB_URL", raising=False)
    raw = tmp_path / "data" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 2))
    pd.DataFrame({"a": x[:, 0], "b": x[:, 1], "label": np.where(x[:, 0] > 0, "hi", "lo")}).to_csv(
        raw / "manifest.csv", index=False
    )
    params = {
        "data": {"source": "manifest"},
        "inputs": {"a": {"modality": "number"}, "b": {"modality": "number"}},
        "target": "label",
        "train": {"epochs": 1, "batch_size": 32, "threads": 1},
        "candidates": [{"name": "concat", "fusion": "concat"}],
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    project = Project.at(tmp_path)
    project.state_dir.mkdir()
    prepare(raw, project.prepared_dir, project.params)
    featurize(project.prepared_dir, project.features_dir, project.params)
    train_one(project, project.params.candidates[0])
    with pytest.raises(AdaptError, match=r"nothing to adapt.*no batch-norm layers"):
        adapt_artifact(project.models_dir / "concat", raw / "manifest.csv", tmp_path / "out")


def test_every_member_of_an_ensemble_adapts(tmp_path, new_domain, monkeypatch):
    monkeypatch.delenv("MMOPS_DB_URL", raising=False)
    project = make_project(tmp_path / "ens", {"seeds": 2, "ensemble": True, "epochs": 1})
    source = project.models_dir / "tones"
    summary = adapt_artifact(source, new_domain, tmp_path / "out", target="label")
    assert summary["members"] == 2
    adapted, original = load_model(tmp_path / "out"), load_model(source)
    assert isinstance(adapted, Ensemble) and len(adapted.members) == 2
    mean, _ = expected_first_norm(adapted.members[0], new_domain)
    for member, before in zip(adapted.members, original.members, strict=True):
        assert torch.allclose(member.encoders["audio"].features[0].running_mean, mean, atol=1e-4)
        last = [m for m in member.modules() if isinstance(m, torch.nn.BatchNorm1d)][-1]
        old = [m for m in before.modules() if isinstance(m, torch.nn.BatchNorm1d)][-1]
        assert not torch.allclose(last.running_mean, old.running_mean)


def test_cli_adapts_the_best_candidate_and_refuses_bad_names(project, new_domain, monkeypatch):
    monkeypatch.delenv("MMOPS_DB_URL", raising=False)
    bad = runner.invoke(app, ["adapt", str(new_domain), "-p", str(project.root), "--name", "Site 2!"])
    assert bad.exit_code == 2 and "--name" in bad.output
    unknown = runner.invoke(app, ["adapt", str(new_domain), "-p", str(project.root), "--candidate", "nope"])
    assert unknown.exit_code == 2 and "no trained candidate 'nope'" in unknown.output
    done = runner.invoke(app, ["adapt", str(new_domain), "-p", str(project.root), "--name", "site-2"])
    assert done.exit_code == 0, done.output
    assert "12 rows" in done.output and "before" in done.output and "after" in done.output
    assert (project.models_dir / "adapted" / "site-2" / ADAPTATION_FILE).is_file()
    # The default name is the manifest's folder ("site") when the file is called manifest.csv.
    default = runner.invoke(app, ["adapt", str(new_domain), "-p", str(project.root)])
    assert default.exit_code == 0, default.output
    assert load_model(project.models_dir / "adapted" / "site") is not None


def test_pseudo_labels_are_the_models_confident_answers_and_ignore_given_labels(project, new_domain, tmp_path):
    source = project.models_dir / "tones"
    answers = Predictor(source).predict([{"audio": p} for p in (new_domain.parent / pd.read_csv(new_domain)["audio"])])
    top = np.array([a["top_k"][0]["probability"] for a in answers])
    threshold = float(np.median(top))
    kept, stats = pseudo_labels(source, new_domain, threshold, "label")
    expected = [i for i, p in enumerate(top) if p >= threshold - 1e-6]
    assert stats["kept"] == len(kept) == len(expected) and stats["of"] == 12
    assert list(kept["label"]) == [answers[i]["answer"] for i in expected]
    assert (kept["pseudo_confidence"] >= round(threshold, 4) - 1e-4).all()
    assert list(kept.columns) == ["audio", "label", "pseudo_confidence"]
    # The manifest's own labels only measure: scrambled, the same rows and guesses come back.
    rows = pd.read_csv(new_domain)
    rows["label"] = "low"
    rows.to_csv(new_domain, index=False)
    again, stats2 = pseudo_labels(source, new_domain, threshold, "label")
    assert again.equals(kept)
    assert stats2["correct"] == pytest.approx(float((kept["label"] == "low").mean()))
    with pytest.raises(AdaptError, match=r"threshold is a probability"):
        pseudo_labels(source, new_domain, 1.5, "label")


def test_cli_appends_pseudo_labels_as_a_training_batch(project, new_domain, monkeypatch):
    monkeypatch.delenv("MMOPS_DB_URL", raising=False)
    done = runner.invoke(
        app, ["adapt", str(new_domain), "-p", str(project.root), "--name", "site-3", "--pseudo-labels", "0.5"]
    )
    assert done.exit_code == 0, done.output
    batches = list(project.appended_dir.glob("*/manifest.csv"))
    assert len(batches) == 1, done.output
    appended = pd.read_csv(batches[0])
    assert set(appended["split"]) == {"train"} and (appended["pseudo_confidence"] >= 0.5).all()
    assert all((batches[0].parent / f).is_file() for f in appended["audio"])  # the clips travel with the batch
    assert not list(new_domain.parent.glob(".mmops-pseudo-labels-*"))  # the staging file is gone
    again = runner.invoke(
        app, ["adapt", str(new_domain), "-p", str(project.root), "--name", "site-3", "--pseudo-labels", "0.5"]
    )
    assert again.exit_code == 0 and "already appended" in " ".join(again.output.split())
    assert list(project.appended_dir.glob("*/manifest.csv")) == batches
    # A later round (the retrained model answers differently; here a stricter threshold) replaces it.
    third = runner.invoke(
        app, ["adapt", str(new_domain), "-p", str(project.root), "--name", "site-3", "--pseudo-labels", "0.7"]
    )
    assert third.exit_code == 0, third.output
    now = list(project.appended_dir.glob("*/manifest.csv"))
    if "nothing to append" in third.output:  # no answer that sure: the earlier round stays
        assert now == batches
    else:
        assert len(now) == 1 and now != batches and "replacing the earlier round" in " ".join(third.output.split())
        assert json.loads((now[0].parent / PSEUDO_FILE).read_text())["threshold"] == 0.7


@pytest.mark.slow
def test_package_registers_its_own_model_line_and_the_bento_serves_the_adapted_model(project, new_domain):
    """`--package`: a version of '<model_name>-<name>' whose run is the source's, and a bento that answers
    as the adapted artifact does (about a minute: a wheel, a bento, a server)."""
    import base64

    import httpx
    from conftest import mmops, serve_bento

    from mmops.registry.store import Registry

    out = mmops(project.root, "adapt", str(new_domain), "--name", "site-9", "--package").stdout
    bento = out.split("bento ")[-1].strip()
    model_name = f"{project.params.registry.model_name}-site-9"
    versions = Registry(f"sqlite:///{project.state_dir / 'registry.db'}").model_versions(model_name)
    source = json.loads((project.models_dir / "tones" / "result.json").read_text())
    assert [v.run_id for v in versions] == [source["run_id"]] and versions[0].bento_tag == bento
    clips = [new_domain.parent / f for f in pd.read_csv(new_domain)["audio"][:4]]
    expected = Predictor(project.models_dir / "adapted" / "site-9", device="cpu").predict(
        [{"audio": c} for c in clips], top_k=2
    )
    items = [{"audio": base64.b64encode(c.read_bytes()).decode()} for c in clips]
    with serve_bento(project.root, bento) as (url, _):
        answers = httpx.post(f"{url}/predict_batch", json={"items": items, "top_k": 2}, timeout=30).json()
        info = httpx.post(f"{url}/model", timeout=30).json()
    assert info["adaptation"]["manifest_sha256"] == digest(new_domain) and info["adaptation"]["rows"] == 12
    assert [a["answer"] for a in answers] == [e["answer"] for e in expected]
    got = [[round(t["probability"], 4) for t in a["top_k"]] for a in answers]
    assert got == [[round(t["probability"], 4) for t in e["top_k"]] for e in expected]


def test_frozen_encoders_keep_their_statistics(project, new_domain):
    """A frozen encoder's features may be cached by content: its batch-norm layers are not adapted."""
    predictor = Predictor(project.models_dir / "tones")
    model = predictor.model
    assert len(adaptable_norms(model)) >= 3
    model.encoders["audio"].frozen = True  # as a pretrained checkpoint's encoder, or `freeze: true`
    assert adaptable_norms(model) == []
    before = {n: b.clone() for n, b in model.named_buffers()}
    rows = [predictor.validate({"audio": new_domain.parent / f}) for f in pd.read_csv(new_domain)["audio"]]
    with reestimating(model) as layers:
        assert layers == 0
        predictor.logits(rows)
    assert all(torch.equal(b, before[n]) for n, b in model.named_buffers())
