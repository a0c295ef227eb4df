"""Taxon-aware splits of labelled images, seeded and reproducible.

- ``split_mode = "species"``: whole species are held out (unseen-species evaluation).
  All species are shuffled once and the first ``round(test_fraction * n)`` go to
  test, the next ``round(val_fraction * n)`` to val. With
  ``keep_genus_in_train`` a genus never loses all its species to held-out
  splits: its first held-out species (in shuffled order) returns to train.
- ``split_mode = "images"``: every species keeps at least one train image; the rest
  of its images are shuffled and cut by the same fractions.

Species with fewer than ``min_images_per_species`` images are left out and
listed in the metadata.
"""

from dataclasses import dataclass

from embedpipe.core.seeding import rng_for

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SpeciesImages:
    species_id: str
    genus_lineage: str
    image_rows: list[int]  # rows in the image table, in a stable order


def split_species(species: list[SpeciesImages], config) -> tuple[dict[int, str], dict]:
    """Image row -> split, and the metadata recording every choice."""
    eligible = [s for s in species if len(s.image_rows) >= config.min_images_per_species]
    dropped = sorted(s.species_id for s in species if s not in eligible)
    assignment: dict[int, str] = {}
    held_out: dict[str, list[str]] = {"val": [], "test": []}
    if config.split_mode == "species":
        order = sorted(eligible, key=lambda s: s.species_id)
        rng_for(config.seed, "species").shuffle(order)
        n_test = round(config.test_fraction * len(order))
        n_val = round(config.val_fraction * len(order))
        side = {
            s.species_id: ("test" if i < n_test else "val" if i < n_test + n_val else "train")
            for i, s in enumerate(order)
        }
        if config.keep_genus_in_train:
            _keep_each_genus_in_train(order, side)
        for s in eligible:
            assignment.update(dict.fromkeys(s.image_rows, side[s.species_id]))
            if side[s.species_id] != "train":
                held_out[side[s.species_id]].append(s.species_id)
    else:
        for s in eligible:
            rows = list(s.image_rows)
            rng_for(config.seed, s.species_id).shuffle(rows)
            n_test = round(config.test_fraction * len(rows))
            n_val = round(config.val_fraction * len(rows))
            n_test = min(n_test, len(rows) - 1)
            n_val = min(n_val, len(rows) - 1 - n_test)
            for i, row in enumerate(rows):
                assignment[row] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    metadata = {
        **config.model_dump(
            mode="json",
            include={
                "split_mode",
                "test_fraction",
                "val_fraction",
                "min_images_per_species",
                "keep_genus_in_train",
                "seed",
            },
        ),
        "held_out_species": {k: sorted(v) for k, v in held_out.items()},
        "too_few_images": dropped,
    }
    return assignment, metadata


def _keep_each_genus_in_train(order: list[SpeciesImages], side: dict[str, str]) -> None:
    by_genus: dict[str, list[SpeciesImages]] = {}
    for s in order:
        by_genus.setdefault(s.genus_lineage, []).append(s)
    for members in by_genus.values():
        if all(side[s.species_id] != "train" for s in members):
            side[members[0].species_id] = "train"
