"""evaluate: models or precomputed embeddings -> metrics, per-image results, an HTML report.

Output (``OUT``, a dataset of kind ``evaluation``): one row per model and image with
that image's results (zero-shot prediction and rank, retrieval ranks, image->image
first hit and average precision, probe prediction, anomaly scores); and in
``OUT/.embedpipe/``: ``metrics.json`` (clip_benchmark's metric names per model),
``confusion_matrix.json`` (labels + matrix per model), ``report.html`` (plots inline),
``config.json``, and ``manifest.json`` last.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from embedpipe.config.evaluate import TASKS, EvaluateSettings
from embedpipe.core import datasets, outputs, storage
from embedpipe.core.finite import check_embeddings
from embedpipe.core.recall_rules import category_gallery_problem, k_too_large, too_few_classes
from embedpipe.core.results import StageMetrics
from embedpipe.core.schemas import EVALUATION_KIND, IMAGES_KIND
from embedpipe.evaluate import metrics as m
from embedpipe.evaluate import plots, probes
from embedpipe.evaluate.nested import prefix_recalls
from embedpipe.evaluate.preflight import (
    check_given_settings,
    check_sources,
    given_settings,
)
from embedpipe.evaluate.report import render_report
from embedpipe.evaluate.sources import (
    EmbeddingsSource,
    MissingGroundTruth,
    ProjectedEncoder,
    Source,
    open_source,
)
from embedpipe.evaluate.truth import Truth, read_metadata
from embedpipe.models.identity import weights_identity

log = logging.getLogger(__name__)

METRICS_NAME = "metrics.json"
CONFUSION_NAME = "confusion_matrix.json"
REPORT_NAME = "report.html"


@dataclass(frozen=True)
class EvaluateResult(StageMetrics):
    out_uri: str
    models: list[str]
    model_metrics: dict[str, dict[str, float | None]]
    skipped: dict[str, str]
    rows: int
    seconds: float

    def metrics(self) -> dict[str, float]:
        """For ``Output[Metrics]``: clip_benchmark's names for one model, ``MODEL: name``
        for several; null values (acc5 under five classes) left out."""
        prefix = len(self.models) > 1
        return {
            (f"{model}: {name}" if prefix else name): value
            for model, values in self.model_metrics.items()
            for name, value in values.items()
            if value is not None
        }


@dataclass
class ModelRun:
    name: str
    source: str
    metrics: dict[str, float] = field(default_factory=dict)
    columns: dict[str, Any] = field(default_factory=dict)
    confusion: dict[str, Any] | None = None
    figures: list[tuple[str, str]] = field(default_factory=list)
    anomalies: list[dict[str, Any]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


class KTooLarge(MissingGroundTruth):
    """recall@K over a gallery of at most K images (1 for any model)."""


def _check_k(ks: tuple[int, ...], size: int, what: str) -> None:
    problem = k_too_large(ks, size, what)
    if problem:
        raise KTooLarge(problem)


class Evaluation:
    def __init__(self, truth: Truth, config: EvaluateSettings, device):
        self.truth = truth
        self.config = config
        self.device = device
        self.n = truth.table.num_rows

    def zeroshot(self, encoder, vectors, run: ModelRun) -> None:
        truth, config = self.truth, self.config
        if not encoder.has_text:
            raise MissingGroundTruth(f"zero-shot classification: {encoder.why_no_text()}")
        labels = truth.labels()
        single = too_few_classes(len(labels.class_names), "zero-shot classification")
        if single:
            raise MissingGroundTruth(single)
        rows = truth.in_split(config.eval_split) & (labels.targets >= 0)
        if not rows.any():
            raise MissingGroundTruth(
                f"zero-shot classification: no labelled rows in split '{config.eval_split}'"
            )
        templates = truth.templates()
        prompts = [t.format(c=name) for name in labels.class_names for t in templates]
        prompt_vectors = m.as_tensor(encoder.texts(prompts), self.device)
        classifier = m.zeroshot_classifier(
            prompt_vectors.reshape(len(labels.class_names), len(templates), -1)
        )
        targets = labels.targets[rows]
        result = m.zeroshot(_take(vectors, np.flatnonzero(rows)), classifier, targets)
        run.metrics.update(
            m.zeroshot_metrics(result["top"], result["rank"], targets, len(labels.class_names))
        )
        names = np.asarray(labels.class_names, dtype=object)
        top: list[list[str] | None] = [None] * self.n
        for row, best in zip(np.flatnonzero(rows).tolist(), result["top"], strict=True):
            top[row] = names[best].tolist()
        rank = np.full(self.n, -1, dtype=np.int64)
        rank[rows] = result["rank"]
        run.columns["zeroshot_top"] = pa.array(top, pa.list_(pa.string()))
        run.columns["zeroshot_rank"] = _nullable_int(rank)
        matrix = m.confusion_matrix(targets, result["top"][:, 0], len(labels.class_names))
        run.confusion = {"labels": labels.class_names, "matrix": matrix.tolist()}
        run.figures.append(
            (
                "Zero-shot confusion matrix",
                plots.confusion_plot(matrix, labels.class_names, run.name),
            )
        )

    def retrieval(self, encoder, vectors, run: ModelRun) -> None:
        if not encoder.has_text:
            raise MissingGroundTruth(f"image-text retrieval: {encoder.why_no_text()}")
        rows = self.truth.in_split(self.config.eval_split)
        captions = self.truth.captions(rows)
        images = np.unique(captions.pair_row)
        _check_k(self.config.recall_k, len(images), "the images with captions")
        _check_k(self.config.recall_k, len(captions.texts), "the distinct captions")
        local = np.searchsorted(images, captions.pair_row)
        texts = m.as_tensor(encoder.texts(captions.texts), self.device)
        text_ranks, image_ranks = m.text_image_ranks(
            texts, _take(vectors, images), captions.pair_text, local
        )
        run.metrics.update(m.retrieval_metrics(text_ranks, image_ranks, self.config.recall_k))
        per_image = np.full(self.n, -1, dtype=np.int64)
        per_image[images] = image_ranks
        run.columns["text_retrieval_rank"] = _nullable_int(per_image)
        ranks_of_row: list[list[int] | None] = [None] * self.n
        for text, row in zip(captions.pair_text.tolist(), captions.pair_row.tolist(), strict=True):
            ranks_of_row[row] = [*(ranks_of_row[row] or []), int(text_ranks[text])]
        run.columns["image_retrieval_ranks"] = pa.array(ranks_of_row, pa.list_(pa.int64()))

    def image_retrieval(self, encoder, vectors, run: ModelRun) -> None:
        truth, config = self.truth, self.config
        truth.need("image->image retrieval", "category", "concept", "split")
        queries = truth.in_split(config.query_split)
        if not queries.any():
            raise MissingGroundTruth(
                f"image->image retrieval: no query images (split '{config.query_split}')"
            )
        categories = truth.strings("category")
        problem = category_gallery_problem(config.recall_k, categories[queries], categories)
        if problem:
            raise KTooLarge(problem)
        concepts = np.unique(truth.strings("concept"), return_inverse=True)[1]
        result = m.category_retrieval(vectors, categories, concepts, queries)
        if not (result["first_hit"] >= 0).any():
            raise MissingGroundTruth(
                "image->image retrieval: no query has another image of its concept"
            )
        run.metrics.update(
            m.category_retrieval_metrics(
                result["first_hit"], result["average_precision"], config.recall_k
            )
        )
        run.metrics["image_image_queries"] = int((result["first_hit"] >= 0).sum())
        run.columns["image_image_first_hit"] = _nullable_int(result["first_hit"])
        ap = result["average_precision"]
        run.columns["image_image_ap"] = pa.array(ap, pa.float64(), mask=np.isnan(ap))

    def _probe_rows(self, task: str) -> tuple[np.ndarray, np.ndarray]:
        config = self.config
        train = self.truth.in_split(config.probe_train_split)
        test = self.truth.in_split(config.probe_eval_split)
        for split, rows in ((config.probe_train_split, train), (config.probe_eval_split, test)):
            if not rows.any():
                raise MissingGroundTruth(f"{task}: no rows in split '{split}'")
        return train, test

    def linear_probe(self, encoder, vectors, run: ModelRun) -> None:
        config, truth = self.config, self.truth
        column = config.probe_label_column
        truth.need("linear probe", column)
        train, test = self._probe_rows("linear probe")
        labels = truth.strings(column)
        train &= labels != None  # noqa: E711 (element-wise)
        test &= labels != None  # noqa: E711
        unseen = sorted(set(labels[test]) - set(labels[train]))
        if unseen:
            raise MissingGroundTruth(
                f"linear probe: {len(unseen)} '{column}' label(s) of split "
                f"'{config.probe_eval_split}' never occur in '{config.probe_train_split}' "
                f"(e.g. {unseen[0]!r}); set probe_label_column"
            )
        if len(set(labels[train])) < 2:
            raise MissingGroundTruth(f"linear probe: '{column}' has one class in training")
        embeddings = vectors.cpu().numpy()
        predicted = probes.linear_probe(
            embeddings[train],
            labels[train].astype(str),
            embeddings[test],
            config.probe_c,
            config.probe_max_iter,
            config.seed,
        )
        run.metrics["linear_probe_acc1"] = float((predicted == labels[test].astype(str)).mean())
        column_values = np.full(self.n, None, dtype=object)
        column_values[test] = predicted
        run.columns["linear_probe_prediction"] = pa.array(column_values.tolist(), pa.string())

    def regression_probe(self, encoder, vectors, run: ModelRun) -> None:
        config = self.config
        if not config.regression_columns:
            raise MissingGroundTruth("regression probe: no regression_columns set")
        train, test = self._probe_rows("regression probe")
        embeddings = vectors.cpu().numpy()
        for column in config.regression_columns:
            values = self.truth.numeric(column)
            known = ~np.isnan(values)
            fit, score = train & known, test & known
            if fit.sum() < 2 or score.sum() < 2:
                raise MissingGroundTruth(
                    f"regression probe: column '{column}' has under 2 values in a split"
                )
            predicted = probes.regression_probe(
                embeddings[fit], values[fit], embeddings[score], config.regression_alpha
            )
            run.metrics[f"regression_probe_r2_{column}"] = probes.r2(values[score], predicted)
            column_values = np.full(self.n, np.nan)
            column_values[score] = predicted
            run.columns[f"regression_probe_{column}"] = pa.array(
                column_values, pa.float64(), mask=np.isnan(column_values)
            )

    def anomaly(self, encoder, vectors, run: ModelRun) -> None:
        config = self.config
        rows = np.flatnonzero(self.truth.in_split(config.eval_split))
        if len(rows) <= config.anomaly_neighbors:
            raise MissingGroundTruth(
                f"anomaly detection: anomaly_neighbors {config.anomaly_neighbors} needs more "
                f"than {len(rows)} images"
            )
        subset = _take(vectors, rows)
        knn = m.knn_distances(subset, config.anomaly_neighbors)
        forest = probes.isolation_scores(subset.cpu().numpy(), config.anomaly_trees, config.seed)
        for name, scores in (("anomaly_knn_distance", knn), ("anomaly_isolation_score", forest)):
            full = np.full(self.n, np.nan)
            full[rows] = scores
            run.columns[name] = pa.array(full, pa.float64(), mask=np.isnan(full))
        ids = self.truth.ids
        order = np.argsort(-knn, kind="stable")[: config.anomaly_top]
        run.anomalies = [
            {"image_id": ids[rows[k]], "knn": float(knn[k]), "isolation": float(forest[k])}
            for k in order
        ]


def _take(vectors, rows: np.ndarray):
    import torch

    return vectors[torch.as_tensor(rows, dtype=torch.long, device=vectors.device)]


def _nullable_int(values: np.ndarray) -> pa.Array:
    return pa.array(values, pa.int64(), mask=values < 0)


def _resolve_tasks(config: EvaluateSettings) -> tuple[list[str], bool]:
    return (list(config.tasks), True) if config.tasks else (list(TASKS), False)


@outputs.writes_output(inputs=("metadata_uri", "images_uri", "select_uri"))
def evaluate_models(
    sources: list[Source],
    metadata_uri: str,
    out_uri: str,
    config: EvaluateSettings,
    images_uri: str = "",
    models: dict[str, dict[str, Any]] | None = None,
    select_uri: str = "",
) -> EvaluateResult:
    """Evaluate every source on the images of ``metadata_uri`` (those of ``select_uri``
    only, when given: e.g. dedup's kept images); one report for all.

    ``metadata_uri`` is any dataset with ``image_id`` and the ground truth the tasks use
    (``category``, ``concept``, ``split``, ``label``, ``caption``/``captions``, numeric
    columns): an ``ingest``, ``split`` or ``dedup`` output. Models read the images from
    ``images_uri`` (default: the metadata itself when it is an ``ingest`` output).
    """
    from embedpipe.embed.runtime import resolve_device

    started = time.perf_counter()
    if not sources:
        raise MissingGroundTruth("nothing to evaluate: give --weights or --embeddings")
    out_uri = storage.normalize(out_uri)
    from embedpipe.evaluate import image_signal

    if two_towers := image_signal.image_signal_checkpoints(sources):  # pairs image_signal
        if len(two_towers) > 1:
            raise MissingGroundTruth("evaluate: give one image_signal checkpoint at a time")
        baseline = image_signal.check_baselines(two_towers[0], sources)
        models = image_signal.write_evaluation(
            two_towers[0],
            metadata_uri,
            out_uri,
            images_uri or metadata_uri,
            config,
            select_uri,
            baseline,
        )
        seconds = round(time.perf_counter() - started, 3)
        rows = sum(int(values["held_out_images"]) for values in models.values())
        return EvaluateResult(out_uri, list(models), models, {}, rows, seconds)
    table, kind = read_metadata(metadata_uri)
    if select_uri:
        selected = datasets.read_table(select_uri, columns=["image_id"]).column("image_id")
        before = table.num_rows
        table = table.filter(pc.is_in(table.column("image_id"), selected))
        if not table.num_rows:
            raise MissingGroundTruth(
                f"--select {select_uri}: keeps none of the {before} images of {metadata_uri}; "
                "nothing to evaluate"
            )
    if not table.num_rows:
        raise MissingGroundTruth(f"{metadata_uri}: holds no images; nothing to evaluate")
    if not images_uri and kind == IMAGES_KIND:
        images_uri = metadata_uri
    truth = Truth(table, config)
    check_given_settings(truth, config)
    check_sources(sources, config, models)
    device = resolve_device(config.device)
    evaluation = Evaluation(truth, config, device)
    tasks, explicit = _resolve_tasks(config)
    k_given = "recall_k" in given_settings(config)
    runs: list[ModelRun] = []
    vectors_of: dict[str, np.ndarray] = {}
    precomputed = [source for source in sources if isinstance(source, EmbeddingsSource)]
    for source in sources:
        encoder = open_source(source, config, images_uri, models, precomputed)
        name = encoder.name
        if isinstance(encoder, ProjectedEncoder):
            log.info(
                "%s: the head projects %s (made by its backbone) instead of re-embedding "
                "the images",
                name,
                encoder.embeddings_source,
            )
        while name in {r.name for r in runs}:
            name += "'"
        run = ModelRun(name, encoder.source)
        vectors = m.as_tensor(encoder.images(truth.ids), device)
        check_embeddings(vectors, name, str(encoder.source))
        for task in tasks:
            try:
                getattr(evaluation, task)(encoder, vectors, run)
            except MissingGroundTruth as reason:
                if explicit or (k_given and isinstance(reason, KTooLarge)):
                    raise
                run.skipped[task] = str(reason)
        ran = [task for task in tasks if task not in run.skipped]
        run.metrics.update(prefix_recalls(evaluation, encoder, vectors, ran))
        log.info("evaluated %s: %s", name, run.metrics)
        vectors_of[name] = vectors.cpu().numpy()
        runs.append(run)
        del vectors
    _write_outputs(out_uri, truth, config, runs, vectors_of, images_uri, metadata_uri)
    skipped = {
        f"{run.name}: {task}": reason for run in runs for task, reason in run.skipped.items()
    }
    return EvaluateResult(
        out_uri,
        [run.name for run in runs],
        {run.name: _json_metrics(run.metrics) for run in runs},
        skipped,
        table.num_rows * len(runs),
        round(time.perf_counter() - started, 3),
    )


def _json_metrics(values: dict[str, float]) -> dict[str, float | None]:
    """NaN (acc5 under five classes) is not JSON: null."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in values.items()}


def _results_table(truth: Truth, runs: list[ModelRun]) -> pa.Table:
    base = {"image_id": truth.table.column("image_id")}
    for column in ("category", "concept", "split"):
        if truth.has(column):
            base[column] = truth.table.column(column).cast(pa.string())
    names = sorted({c for run in runs for c in run.columns})
    parts = []
    for run in runs:
        columns = {"model": pa.array([run.name] * truth.table.num_rows, pa.string()), **base}
        for name in names:
            if name in run.columns:
                columns[name] = run.columns[name]
            else:
                kind = next(r.columns[name].type for r in runs if name in r.columns)
                columns[name] = pa.nulls(truth.table.num_rows, kind)
        parts.append(pa.table(columns))
    return pa.concat_tables(parts)


def _write_outputs(out_uri, truth, config, runs, vectors_of, images_uri, metadata_uri) -> None:
    payload = {
        "models": [
            {
                "model": run.name,
                "source": run.source,
                "identity": weights_identity(run.source),  # publish picks its entry by it
                "metrics": _json_metrics(run.metrics),
                "skipped": run.skipped,
            }
            for run in runs
        ],
        "metadata": metadata_uri,
    }
    storage.write_json(datasets.side_path(out_uri, METRICS_NAME), payload)
    confusion = {run.name: run.confusion for run in runs if run.confusion is not None}
    storage.write_json(datasets.side_path(out_uri, CONFUSION_NAME), confusion)
    report = render_report(truth, config, runs, vectors_of, images_uri, metadata_uri)
    storage.write_bytes(datasets.side_path(out_uri, REPORT_NAME), report.encode("utf-8"))
    datasets.save_config(out_uri, "evaluate", config)
    datasets.write_table(
        out_uri,
        _results_table(truth, runs),
        EVALUATION_KIND,
        extra={"models": [run.name for run in runs], "metadata": metadata_uri},
    )
