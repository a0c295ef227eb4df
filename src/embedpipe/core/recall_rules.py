"""When a recall figure means nothing, for train's validation and evaluate alike.

recall@K over a gallery of at most K images is 1 for any model; a query whose concept
has no other image in the gallery cannot hit at all. Both stages ask these functions and
treat the answer the same way: an error when the user named K (or the task), else a skip
with its reason in the output and the report.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def k_too_large(
    ks: Iterable[int], size: int, what: str, flag: str = "recall_k", unit: str = ""
) -> str:
    """Why recall@max(ks) over ``size`` candidates means nothing; "" when it does not."""
    k = max(ks)
    if k > size:
        return f"{flag} {k} is larger than {what} ({size}{unit})"
    return ""


def category_gallery_problem(
    ks: Iterable[int],
    query_categories: np.ndarray,
    categories: np.ndarray,
    flag: str = "recall_k",
) -> str:
    """image->image retrieval within a category: each query's gallery is every other image
    of its category. The problem with the smallest such gallery, or ""."""
    ks = tuple(ks)
    for category in sorted(set(query_categories.tolist())):
        gallery = int((categories == category).sum()) - 1
        what = f"the gallery of category '{category}'"
        problem = k_too_large(ks, gallery, what, flag, " images")
        if problem:
            return problem
    return ""


def too_few_classes(count: int, task: str) -> str:
    """A classification over fewer than two classes is right by construction."""
    if count < 2:
        return f"{task}: {count} class in the data; accuracy over one class means nothing"
    return ""
