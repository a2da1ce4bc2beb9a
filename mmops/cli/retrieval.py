"""``mmops search``, ``mmops embed`` and ``mmops zero-shot``: a contrastive model's towers from the CLI.

They load the latest packaged model (or ``--model``) with its gallery index, as the service does, and
refuse bad input with the service's own messages (exit code 2).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from mmops.cli.common import ProjectOpt, console, fail, load_project

ModelOpt = Annotated[str | None, typer.Option(help="BentoML model tag (default: the latest packaged)")]


def _retriever(project_dir: Path, model: str | None):
    """The packaged model's :class:`~mmops.serving.retrieval.Retriever` and its tag."""
    import bentoml

    from mmops.registry.store import Registry
    from mmops.serving.predictor import Predictor
    from mmops.serving.retrieval import Retriever

    project = load_project(project_dir)
    if model is None:
        versions = [
            v for v in Registry(project.db_url).model_versions(project.params.registry.model_name) if v.model_tag
        ]
        if not versions:
            raise fail("no packaged model yet: run `mmops run` (or `mmops package`) first")
        model = versions[0].model_tag
    path = Path(bentoml.models.get(model).path)
    retriever = Retriever.load(Predictor(path), path)
    if retriever is None:
        raise fail(f"{model} is not a contrastive (two-tower) model: use `mmops predict`", 2)
    return retriever, model


def _answer(retriever, op: str, item: dict) -> dict:
    from mmops.serving.predictor import InputError
    from mmops.serving.retrieval import RetrievalRequests, answer_requests

    index = retriever.index
    requests = RetrievalRequests(
        retriever.embedder.model.spec, retriever.embedder.predictor.decoder, len(index) if index is not None else None
    )
    try:
        return answer_requests(retriever, [requests.decode(op, item)])[0]
    except InputError as exc:
        raise fail(str(exc), 2) from None


def _query(text: str | None, image: Path | None) -> dict:
    if (text is None) == (image is None):
        raise fail("give a text or --image (one of them)", 2)
    return {"text": text} if text is not None else {"image": image.read_bytes()}


def search(
    text: Annotated[str | None, typer.Argument(help='what to look for, e.g. "a red triangle"')] = None,
    image: Annotated[Path | None, typer.Option(exists=True, dir_okay=False, help="search by an image instead")] = None,
    k: Annotated[int, typer.Option("-k", "--k", help="results")] = 5,
    project_dir: ProjectOpt = Path("."),
    model: ModelOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """The k nearest items of the packaged gallery index to a text (or an image)."""
    retriever, tag = _retriever(project_dir, model)
    results = _answer(retriever, "search", {**_query(text, image), "k": k})["results"]
    if as_json:
        print(json.dumps(results, indent=2))
        return
    console.print(f"[bold]{len(results)} of {len(retriever.index)} gallery items[/]  ({tag})")
    for r in results:
        console.print(f"  {r['score']:.4f}  {r['id']}  [dim]{r.get('label', '')}[/]")


def embed(
    text: Annotated[str | None, typer.Argument(help="a text to embed")] = None,
    image: Annotated[Path | None, typer.Option(exists=True, dir_okay=False, help="an image to embed")] = None,
    project_dir: ProjectOpt = Path("."),
    model: ModelOpt = None,
) -> None:
    """A text's or an image's unit vector in the model's shared embedding space (JSON)."""
    retriever, _ = _retriever(project_dir, model)
    print(json.dumps(_answer(retriever, "embed", _query(text, image))["vector"]))


def zero_shot(
    image: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="the image to classify")],
    labels: Annotated[str | None, typer.Option(help='candidate labels, comma-separated: "cat,dog"')] = None,
    label: Annotated[
        list[str] | None, typer.Option("--label", help="one candidate label, kept whole (commas too); repeatable")
    ] = None,
    project_dir: ProjectOpt = Path("."),
    model: ModelOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Rank candidate labels for an image, each through the model's prompt templates (zero-shot)."""
    candidates = [x.strip() for x in (labels or "").split(",") if x.strip()] + list(label or [])
    if not candidates:
        raise fail('give the candidate labels: --labels "cat,dog", or --label for each (a label may hold commas)', 2)
    retriever, tag = _retriever(project_dir, model)
    answer = _answer(retriever, "zero_shot", {"image": image.read_bytes(), "labels": candidates})
    if as_json:
        print(json.dumps({**answer, "model": tag}, indent=2))
        return
    console.print(f"[bold]{answer['answer']}[/]  ({tag})")
    for item in answer["top_k"]:
        console.print(f"  {item['answer']:<20} {item['probability']:.4f}  (cosine {item['score']:.4f})")
