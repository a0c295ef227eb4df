"""The metrics on embeddings, as clip_benchmark defines them, without its dense matrices.

clip_benchmark builds the whole texts x images score matrix and a one-hot tensor per
batch; here scores are computed a block of queries at a time and a query's rank is the
number of candidates scoring strictly above its best positive, read from the same block
(so rounding cannot put a positive above itself). recall@K is ``rank < K``: the same
as clip_benchmark's top-K test whenever scores are not tied.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

# Scores held at once per block of queries (float32): about 256 MB.
BLOCK_ELEMENTS = 1 << 26


def as_tensor(vectors: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    tensor = torch.as_tensor(vectors, dtype=torch.float32)
    return F.normalize(tensor.to(device), dim=-1)


def _block(columns: int) -> int:
    return max(1, BLOCK_ELEMENTS // max(columns, 1))


def zeroshot_classifier(prompt_embeddings: torch.Tensor) -> torch.Tensor:
    """(classes, templates, dim) prompt embeddings -> (dim, classes) class weights: the
    normalised mean of the normalised prompts of each class (clip_benchmark, open_clip)."""
    weights = F.normalize(prompt_embeddings, dim=-1).mean(dim=1)
    return F.normalize(weights, dim=-1).T.contiguous()


def zeroshot(
    images: torch.Tensor, classifier: torch.Tensor, targets: np.ndarray, top: int = 5
) -> dict[str, np.ndarray]:
    """Per image: the ``top`` best classes and the rank of the true class (0 = top-1)."""
    target = torch.as_tensor(targets, dtype=torch.long, device=images.device)
    classes = classifier.shape[1]
    tops, ranks = [], []
    block = _block(classes)
    for start in range(0, len(images), block):
        logits = 100.0 * images[start : start + block] @ classifier
        true = logits.gather(1, target[start : start + block, None])
        ranks.append((logits > true).sum(1).cpu())
        tops.append(logits.topk(min(top, classes), dim=1).indices.cpu())
    return {
        "top": torch.cat(tops).numpy() if tops else np.zeros((0, min(top, classes)), np.int64),
        "rank": torch.cat(ranks).numpy() if ranks else np.zeros(0, np.int64),
    }


def zeroshot_metrics(
    top: np.ndarray, rank: np.ndarray, targets: np.ndarray, classes: int
) -> dict[str, float]:
    """clip_benchmark's ``acc1``, ``acc5`` (NaN under 5 classes) and
    ``mean_per_class_recall`` (sklearn's balanced accuracy: the mean recall of the classes
    present in the targets)."""
    predicted = top[:, 0]
    acc5 = float((rank < 5).mean()) if classes >= 5 else math.nan
    recalls = [float((predicted[targets == c] == c).mean()) for c in np.unique(targets)]
    return {
        "acc1": float((predicted == targets).mean()),
        "acc5": acc5,
        "mean_per_class_recall": float(np.mean(recalls)),
    }


def confusion_matrix(targets: np.ndarray, predicted: np.ndarray, classes: int) -> np.ndarray:
    """Rows: true class, columns: predicted class (sklearn's orientation)."""
    counts = np.bincount(targets * classes + predicted, minlength=classes * classes)
    return counts.reshape(classes, classes)


def _best_positive_ranks(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    pair_query: torch.Tensor,
    pair_candidate: torch.Tensor,
) -> np.ndarray:
    """For each query, how many candidates score strictly above its best positive
    (-1 for a query without positives)."""
    ranks = torch.full((len(queries),), -1, dtype=torch.long)
    order = torch.argsort(pair_query, stable=True)
    pair_query, pair_candidate = pair_query[order], pair_candidate[order]
    block = _block(len(candidates))
    for start in range(0, len(queries), block):
        stop = min(start + block, len(queries))
        scores = queries[start:stop] @ candidates.T
        lo, hi = torch.searchsorted(
            pair_query, torch.tensor([start, stop], device=pair_query.device)
        )
        rows, columns = pair_query[lo:hi] - start, pair_candidate[lo:hi]
        if not len(rows):
            continue
        best = torch.full((stop - start,), -math.inf, device=scores.device)
        best = best.scatter_reduce(0, rows, scores[rows, columns], reduce="amax")
        above = (scores > best[:, None]).sum(1)
        has = torch.isfinite(best)
        ranks[start:stop] = torch.where(has, above, torch.full_like(above, -1)).cpu()
    return ranks.numpy()


def text_image_ranks(
    texts: torch.Tensor, images: torch.Tensor, pair_text: np.ndarray, pair_image: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(per text: images above its best matching image, per image: texts above its best
    matching text). ``pair_text[j]`` describes ``pair_image[j]``."""
    device = texts.device
    pt = torch.as_tensor(pair_text, dtype=torch.long, device=device)
    pi = torch.as_tensor(pair_image, dtype=torch.long, device=device)
    return (
        _best_positive_ranks(texts, images, pt, pi),
        _best_positive_ranks(images, texts, pi, pt),
    )


def retrieval_metrics(
    text_ranks: np.ndarray, image_ranks: np.ndarray, ks: tuple[int, ...]
) -> dict[str, float]:
    """clip_benchmark's names: ``image_retrieval_recall@K`` is text -> image (a text's image
    among the top K images), ``text_retrieval_recall@K`` image -> text."""
    metrics = {}
    image_ranks = image_ranks[image_ranks >= 0]
    for k in ks:
        metrics[f"image_retrieval_recall@{k}"] = float((text_ranks < k).mean())
        metrics[f"text_retrieval_recall@{k}"] = float((image_ranks < k).mean())
    return metrics


def category_retrieval(
    vectors: torch.Tensor,
    categories: np.ndarray,
    concepts: np.ndarray,
    queries: np.ndarray,
) -> dict[str, np.ndarray]:
    """Image -> image retrieval per category (DECISIONS 13): each query against every other
    image of its category; a retrieved image is a hit when it shows the query's concept.

    Per row (-1 / NaN for rows that are not queries or have no positive): the 0-based rank
    of the first hit, the average precision over the whole ranked gallery, and the number
    of positives.
    """
    n = len(vectors)
    first_hit = np.full(n, -1, dtype=np.int64)
    average_precision = np.full(n, np.nan)
    positives = np.zeros(n, dtype=np.int64)
    device = vectors.device
    for category in np.unique(categories):
        members = np.flatnonzero(categories == category)
        asking = members[queries[members]]
        if not len(asking):
            continue
        gallery = vectors[torch.as_tensor(members, device=device)]
        gallery_concepts = torch.as_tensor(concepts[members], device=device)
        position = {row: k for k, row in enumerate(members.tolist())}
        block = _block(len(members) * 3)
        for start in range(0, len(asking), block):
            rows = asking[start : start + block]
            own = torch.as_tensor([position[r] for r in rows.tolist()], device=device)
            scores = vectors[torch.as_tensor(rows, device=device)] @ gallery.T
            scores[torch.arange(len(rows), device=device), own] = -math.inf
            order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :-1]
            wanted = torch.as_tensor(concepts[rows], device=device)
            hits = gallery_concepts[order] == wanted[:, None]
            count = hits.sum(1)
            ranks = torch.arange(1, hits.shape[1] + 1, device=device)
            precision = hits.cumsum(1) / ranks
            ap = (precision * hits).sum(1) / count.clamp(min=1)
            found = count > 0
            first = torch.where(found, hits.float().argmax(1), torch.full_like(count, -1))
            first_hit[rows] = first.cpu().numpy()
            average_precision[rows] = torch.where(found, ap, torch.nan).cpu().double().numpy()
            positives[rows] = count.cpu().numpy()
    return {"first_hit": first_hit, "average_precision": average_precision, "positives": positives}


def category_retrieval_metrics(
    first_hit: np.ndarray, average_precision: np.ndarray, ks: tuple[int, ...]
) -> dict[str, float]:
    scored = first_hit >= 0
    metrics = {f"image_image_recall@{k}": float((first_hit[scored] < k).mean()) for k in ks}
    metrics["image_image_map"] = float(average_precision[scored].mean())
    return metrics


def knn_distances(vectors: torch.Tensor, neighbours: int) -> np.ndarray:
    """Mean Euclidean distance of each vector to its ``neighbours`` nearest others."""
    squared = (vectors * vectors).sum(1)
    out = []
    block = _block(len(vectors))
    for start in range(0, len(vectors), block):
        chunk = vectors[start : start + block]
        distances = squared[start : start + block, None] + squared[None, :] - 2 * chunk @ vectors.T
        distances = distances.clamp(min=0)
        own = torch.arange(len(chunk), device=vectors.device)
        distances[own, own + start] = math.inf
        nearest = distances.topk(neighbours, dim=1, largest=False).values
        out.append(nearest.sqrt().mean(1).cpu())
    return torch.cat(out).double().numpy()
