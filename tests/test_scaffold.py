"""``mmops init`` templates and the BYOD data generator: fast checks, no training."""

from __future__ import annotations

import csv
import io
import subprocess
import wave
from pathlib import Path

import numpy as np
import pytest
import yaml
from byod import TARGETS, write_bad_rows, write_dataset
from PIL import Image

import mmops
from mmops import config
from mmops.scaffold import FILE_TEMPLATES, TEMPLATES, init_project

# The design's keys (data.path, target as a mapping, ...) land in config.py with the BYOD work; until
# then load_params rejects every template, which is expected, not a template bug.
NEW_KEYS = "path" in config.DataConfig.model_fields and hasattr(config, "TargetConfig")


@pytest.fixture(scope="module")
def projects(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each template scaffolded once (git for all but regression, which exercises ``--no-scm``)."""
    base = tmp_path_factory.mktemp("projects")
    return {t: init_project(base / t, t, git=t != "regression") for t in TEMPLATES}


@pytest.mark.parametrize("template", TEMPLATES)
def test_template_files(projects: dict[str, Path], template: str) -> None:
    root = projects[template]
    for name in ("params.yaml", "dvc.yaml", "bentofile.yaml", ".gitignore", "README.md"):
        assert (root / name).is_file(), name
    assert (root / ".dvc").is_dir()
    assert (root / "incoming" / ".gitkeep").is_file() == (template in FILE_TEMPLATES)

    params = yaml.safe_load((root / "params.yaml").read_text())
    assert params["seed"] == 42
    assert {k: params["train"][k] for k in ("epochs", "batch_size", "lr", "patience")} == {
        "epochs": 10,
        "batch_size": 64,
        # captioning's decoder reads the image only at the lower peak LR (docs/captioning.md, measured)
        "lr": 0.001 if template == "captioning" else 0.003,
        "patience": 3,
    }
    assert params["runner"] == {"max_workers": 1}
    assert params["registry"] == {"model_name": template}
    assert set(params["promotion"]) == {"metric", "margin", "min_accuracy", "min_macro_f1"}
    # Copied as is: the comments are the project's documentation.
    assert (root / "params.yaml").read_text().count("#") > 40

    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    assert list(stages) == ["import", "prepare", "featurize"]
    assert [stages[s]["cmd"] for s in stages] == ["mmops data import", "mmops data prepare", "mmops data featurize"]
    if template in FILE_TEMPLATES:
        assert stages["import"]["deps"] == ["incoming"]
        assert stages["import"]["params"] == ["data.source", "data.path", "data.limit"]
        assert (root / params["data"]["path"]).resolve().is_relative_to(root / "incoming")

    bento = yaml.safe_load((root / "bentofile.yaml").read_text())
    assert bento["service"] == "mmops.serving.service:MultimodalService"
    assert bento["include"] == ["/params.yaml"]  # anchored: never BentoML's own folders under .mmops
    assert bento["exclude"] == ["/.mmops/"]
    assert bento["python"]["wheels"] == [f"./dist/mmops-{mmops.__version__}-py3-none-any.whl"]
    assert bento["docker"]["cuda_version"] == "12.8"

    ignored = (root / ".gitignore").read_text().splitlines()
    assert {".mmops/", "/data/raw", "/models", "dist/"} <= set(ignored)
    readme = (root / "README.md").read_text()
    for command in ("mmops data import", "mmops data validate", "mmops run", "mmops serve", "/predict_batch"):
        assert command in readme


@pytest.mark.parametrize(
    ("template", "target", "metric"),
    [
        ("vqa", {"column": "answer", "type": "classification"}, "val_accuracy"),
        ("classification", {"column": "label", "type": "classification"}, "val_accuracy"),
        ("regression", {"column": "score", "type": "regression"}, "val_mae"),
        (
            "retrieval",
            {
                "column": "image_id",
                "type": "contrastive",
                "params": {
                    "image_input": "image",
                    "text_input": "caption",
                    "width": 128,
                    "templates": ["a photo of a {}", "a picture of a {}"],
                },
            },
            "val_recall_mean",
        ),
        (
            "sentiment",
            {"column": "label", "type": "sentiment", "params": {"low": -3, "high": 3, "loss": "l1"}},
            "val_mae",
        ),
    ],
)
def test_template_design_keys(projects: dict[str, Path], template: str, target: dict, metric: str) -> None:
    params = yaml.safe_load((projects[template] / "params.yaml").read_text())
    assert params["target"] == target
    assert params["select_metric"] == metric
    source = {"vqa": "easy-vqa", "retrieval": "coco-captions", "sentiment": "mmsa"}.get(template, "manifest")
    assert params["data"]["source"] == source
    if template in ("classification", "regression"):
        assert params["data"]["path"] == "incoming/manifest.csv"
        inputs = params["inputs"]
        assert {n: s["modality"] for n, s in inputs.items()} == {
            "text": "text",
            "image": "image",
            "audio": "audio",
            "size": "number",
            "shop": "category",
        }
        assert inputs["audio"]["missing"] == "learn"
        assert inputs["size"]["columns"] == ["width", "height"]
        assert [c["fusion"] for c in params["candidates"]] == ["concat", "gated"]


@pytest.mark.xfail(not NEW_KEYS, reason="config.py does not accept the BYOD design's keys yet", strict=False)
@pytest.mark.parametrize("template", TEMPLATES)
def test_template_params_validate(projects: dict[str, Path], template: str) -> None:
    params = config.load_params(projects[template] / "params.yaml")
    assert params.registry.model_name == template
    # sentiment: the field's three classic fusions, TFN, LMF and MulT; retrieval: the two towers fuse
    # nothing, so there is no fusion to compare
    assert len(params.all_candidates()) == {"sentiment": 3, "retrieval": 1}.get(template, 2)


def test_git_and_dvc(projects: dict[str, Path]) -> None:
    for template, root in projects.items():
        has_git = template != "regression"
        assert (root / ".git").is_dir() == has_git, template
        dvc_config = (root / ".dvc" / "config").read_text()
        assert ("no_scm = True" in dvc_config) != has_git, template
    out = subprocess.run(["git", "status", "--porcelain"], cwd=projects["vqa"], capture_output=True, text=True)
    assert ".dvc/config" in out.stdout  # dvc init staged its files in the new repository


def test_init_inside_existing_repo(tmp_path: Path) -> None:
    """A project in a subfolder of a repository: no nested git, DVC as a subdir project."""
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / ".gitignore").write_text("*.log")
    root = init_project(tmp_path / "proj", "classification")
    assert not (root / ".git").exists()
    assert (root / ".dvc").is_dir()
    # At the repository root: the user's README stays, .gitignore gains only what it lacks.
    (tmp_path / "README.md").write_text("mine\n")
    init_project(tmp_path, "vqa")
    assert (tmp_path / "README.md").read_text() == "mine\n"
    lines = (tmp_path / ".gitignore").read_text().splitlines()
    assert lines[0] == "*.log" and ".mmops/" in lines and len(lines) == len(set(lines))


def test_refuses_existing_project(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("seed: 1\n")
    with pytest.raises(ValueError, match=r"already a project \(params.yaml exists\)"):
        init_project(tmp_path, "vqa", git=False)
    assert (tmp_path / "params.yaml").read_text() == "seed: 1\n"
    assert not (tmp_path / "dvc.yaml").exists()


def test_unknown_template(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match="unknown template 'nope'; available: vqa, classification, regression, retrieval"
    ):
        init_project(tmp_path / "p", "nope")
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("kind", TARGETS)
def test_write_dataset(tmp_path: Path, kind: str) -> None:
    manifest = write_dataset(tmp_path, kind, n=60, seed=3)
    assert manifest == tmp_path / "manifest.csv"
    with manifest.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 60
    assert list(rows[0]) == ["text", "image", "audio", "width", "height", "shop", TARGETS[kind], "split"]
    assert sum(r["split"] == "train" for r in rows) == 48
    assert 0 < sum(not r["audio"] for r in rows) < 20
    for r in rows:
        with Image.open(tmp_path / r["image"]) as img:
            assert img.size == (24, 24) and img.mode == "RGB"
            img.load()
        if r["audio"]:
            with wave.open(str(tmp_path / r["audio"])) as w:
                assert (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()) == (1, 2, 8000, 4000)
        assert float(r["width"]) > 0 and float(r["height"]) > 0
        assert r[TARGETS[kind]]
    targets = [r[TARGETS[kind]] for r in rows]
    if kind == "classification":
        assert set(targets) == {"red", "green", "blue"}
        for r in rows:  # the label is the image's dominant colour
            means = np.asarray(Image.open(tmp_path / r["image"])).reshape(-1, 3).mean(axis=0)
            assert ("red", "green", "blue")[int(means.argmax())] == r["label"]
    elif kind == "regression":
        values = np.array(targets, dtype=float)
        assert values.std() > 1
    else:
        assert all(set(t.split("|")) <= {"bright", "loud", "large"} for t in targets)
        assert {"bright", "loud", "large"} <= {tag for t in targets for tag in t.split("|")}


def test_write_dataset_deterministic(tmp_path: Path) -> None:
    a = write_dataset(tmp_path / "a", "regression", n=20, seed=7)
    b = write_dataset(tmp_path / "b", "regression", n=20, seed=7)
    c = write_dataset(tmp_path / "c", "regression", n=20, seed=8)
    assert a.read_text() == b.read_text() != c.read_text()
    for name in ("images/5.png", "audio/6.wav"):
        assert (a.parent / name).read_bytes() == (b.parent / name).read_bytes()


def test_write_bad_rows(tmp_path: Path) -> None:
    manifest = write_dataset(tmp_path, "classification", n=20)
    lines = write_bad_rows(manifest)
    assert lines == [22, 23, 24, 25, 26]
    text = manifest.read_text().splitlines()
    with manifest.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(text) == 26 and len(rows) == 25
    bad = rows[20:]
    assert not (tmp_path / bad[0]["image"]).exists()
    with pytest.raises(OSError):
        Image.open(io.BytesIO((tmp_path / bad[1]["image"]).read_bytes())).load()
    assert bad[2]["image"] == "../../etc/passwd"
    assert bad[3]["width"] == "wide"
    assert bad[4]["label"] == ""
