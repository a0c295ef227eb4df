"""Which rows make up each batch: a seeded order, hard negatives kept together, a UCB bandit.

An epoch's batches are a pure function of (seed, epoch), so a resumed run picks up at
the saved batch index and sees exactly the batches the interrupted run would have.
A share of each batch is queries followed by their mined negatives (the mining
output: ``query_id``, ``negative_ids``, ``band``), so the in-batch negatives of a
contrastive loss are hard ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from embedpipe.core import datasets
from embedpipe.core.schemas import NEGATIVES_KIND
from embedpipe.core.seeding import derived_seed
from embedpipe.train.data import Examples


@dataclass
class MinedNegatives:
    """Per query row: its negative rows and each one's band (training rows only)."""

    negatives: dict[int, list[int]]
    bands: dict[int, list[str]]
    band_names: list[str]


def load_negatives(negatives_uri: str, examples: Examples) -> MinedNegatives:
    table = datasets.read_table(negatives_uri, NEGATIVES_KIND, ["query_id", "negative_ids", "band"])
    train = examples.split == "train"
    negatives: dict[int, list[int]] = {}
    bands: dict[int, list[str]] = {}
    names: dict[str, None] = {}  # bands in the order first seen
    for query, negative_ids, negative_bands in zip(
        *(table.column(n).to_pylist() for n in table.column_names), strict=True
    ):
        row = examples.index.get(query)
        if row is None or not train[row]:
            continue
        kept = [
            (examples.index[n], band)
            for n, band in zip(negative_ids, negative_bands, strict=True)
            if n in examples.index and train[examples.index[n]]
        ]
        if kept:
            negatives[row] = [n for n, _ in kept]
            bands[row] = [band for _, band in kept]
            names.update(dict.fromkeys(band for _, band in kept))
    return MinedNegatives(negatives, bands, list(names))


def batches_per_epoch(train_rows: int, global_batch: int) -> int:
    return max(1, train_rows // global_batch)


def epoch_batches(
    train_rows: np.ndarray,
    global_batch: int,
    seed: int,
    epoch: int,
    mined: MinedNegatives | None = None,
    hard_share: float = 0.0,
) -> list[list[int]]:
    """The epoch's global batches of rows; every batch has ``global_batch`` distinct rows
    (fewer only when the training split is smaller than a batch)."""
    rng = np.random.default_rng(derived_seed(seed, "order", str(epoch)))
    order = rng.permutation(train_rows).tolist()
    size = min(global_batch, len(order))
    queries = rng.permutation(sorted(mined.negatives)).tolist() if mined else []
    hard_slots = round(hard_share * size) if queries else 0
    batches, position, next_query = [], 0, 0
    for _ in range(batches_per_epoch(len(order), global_batch)):
        batch: list[int] = []
        taken: set[int] = set()
        tries = 0
        while len(batch) < hard_slots and tries < len(queries):
            query = queries[next_query % len(queries)]
            next_query += 1
            tries += 1
            for row in [query, *mined.negatives[query]]:
                if row not in taken and len(batch) < hard_slots:
                    batch.append(row)
                    taken.add(row)
        while len(batch) < size:
            row = order[position % len(order)]
            position += 1
            if row not in taken:
                batch.append(row)
                taken.add(row)
        batches.append(batch)
    return batches


@dataclass
class BandBandit:
    """UCB1 over difficulty bands: each batch draws its negatives from one band.

    The reward of a pull is how much that band's triplets still violate the margin
    (the mean hinge ``max(0, d(a,p) - d(a,n) + margin)`` before the update): a band
    the model has learnt pays less, so the bandit moves on to harder ones."""

    bands: list[str]
    exploration: float
    pulls: list[int] = field(default_factory=list)
    reward_sums: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.pulls = self.pulls or [0] * len(self.bands)
        self.reward_sums = self.reward_sums or [0.0] * len(self.bands)

    def choose(self) -> int:
        for arm, pulls in enumerate(self.pulls):
            if pulls == 0:
                return arm
        total = sum(self.pulls)
        scores = [
            reward / pulls + self.exploration * math.sqrt(math.log(total) / pulls)
            for reward, pulls in zip(self.reward_sums, self.pulls, strict=True)
        ]
        return int(np.argmax(scores))

    def update(self, arm: int, reward: float) -> None:
        self.pulls[arm] += 1
        self.reward_sums[arm] += float(reward)

    def state(self) -> dict:
        return {"bands": self.bands, "pulls": self.pulls, "reward_sums": self.reward_sums}

    def summary(self) -> dict[str, dict[str, float]]:
        return {
            band: {"pulls": pulls, "mean_reward": reward / pulls if pulls else 0.0}
            for band, pulls, reward in zip(self.bands, self.pulls, self.reward_sums, strict=True)
        }


def triplet_negatives(
    anchors: list[int],
    band: str | None,
    mined: MinedNegatives | None,
    examples: Examples,
    train_rows: np.ndarray,
    seed: int,
    step: int,
) -> list[int]:
    """A negative per anchor: a mined one of ``band`` where it has one, else a random
    training image of another concept (drawn from seed and step, so resumes repeat it)."""
    rng = np.random.default_rng(derived_seed(seed, "negatives", str(step)))
    labels = examples.labels
    negatives = []
    for anchor in anchors:
        choices = []
        if mined and anchor in mined.negatives:
            pairs = zip(mined.negatives[anchor], mined.bands[anchor], strict=True)
            choices = [row for row, b in pairs if band is None or b == band]
        if choices:
            negatives.append(choices[int(rng.integers(len(choices)))])
            continue
        for _ in range(64):
            row = int(train_rows[int(rng.integers(len(train_rows)))])
            if labels[row] != labels[anchor]:
                break
        negatives.append(row)
    return negatives
