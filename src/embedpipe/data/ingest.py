"""ingest: folders, tar archives or s3:// prefixes of images -> Parquet image shards.

Sources follow the PerVA layout, or are the ImageNet validation set or COCO
captions (``known_sources``), whose rows carry the optional ``label`` or
``captions`` column.

Each image is decoded once to prove it is whole (JPEGs in draft mode, at an
eighth of their size, which still reads every coded block), hashed, and
written with its original bytes and its displayed (EXIF-oriented) size.
Unreadable images, and images over the size caps (checked before decoding or
reading), are listed in ``.embedpipe/rejected.parquet`` with the reason and
the run goes on. Decoding runs in a process pool fed a bounded window of
chunks, so memory stays flat however many images there are, and rows keep the
sources' order.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
from tqdm import tqdm

from embedpipe.config import IngestSettings
from embedpipe.core import datasets, images, outputs, parallel, storage
from embedpipe.core.images import ImageLimits
from embedpipe.core.rejected import REJECTED_NAME, write_rejected
from embedpipe.core.results import StageMetrics
from embedpipe.core.schemas import IMAGES_KIND, IMAGES_SCHEMA, images_schema
from embedpipe.data import known_sources, signals
from embedpipe.data.hf_sources import hf_members
from embedpipe.data.signals import SignalColumn, SignalJoin
from embedpipe.data.sources import LayoutError, Member, SourceReader, resolve_source

log = logging.getLogger(__name__)

CHUNK_IMAGES = 32
REPORT_NAME = "ingest_report.json"


@dataclass(frozen=True)
class IngestResult(StageMetrics):
    out_uri: str
    images: int
    distinct_images: int
    rejected: int
    skipped_non_image: int
    shards: int
    seconds: float


def inspect_image(data: bytes, limits: ImageLimits) -> tuple[str, int, int] | str:
    """(sha256, displayed width, height) of a whole image, or the reason it is rejected."""
    try:
        width, height = images.inspect(data, limits)
    except images.ImageRejected as rejected:
        return str(rejected)
    return hashlib.sha256(data).hexdigest(), width, height


def inspect_chunk(limits: ImageLimits, chunk: list[bytes]) -> list[tuple[str, int, int] | str]:
    return [inspect_image(data, limits) for data in chunk]


class _RowBuffer:
    def __init__(self, schema: pa.Schema, signal_columns: Sequence[SignalColumn] = ()) -> None:
        self.schema = schema
        self.signal_columns = list(signal_columns)
        self.base = pa.schema(list(schema)[: len(schema) - len(self.signal_columns)])
        self.optional_names = self.base.names[len(IMAGES_SCHEMA) :]
        self.columns: dict[str, list] = {name: [] for name in self.base.names}
        self.signals: list[Mapping[str, Any]] = []

    def __len__(self) -> int:
        return len(self.columns["image_id"])

    def add(
        self,
        member: Member,
        data: bytes,
        image_id: str,
        width: int,
        height: int,
        signals: Mapping[str, Any] | None = None,
    ) -> None:
        self.signals.append(signals or {})
        placement = member.placement
        values = (image_id, data, member.source, placement.category, placement.concept)
        for name, value in zip(
            IMAGES_SCHEMA.names, (*values, placement.split, width, height), strict=True
        ):
            self.columns[name].append(value)
        for name in self.optional_names:  # null where this row's source has no such column
            self.columns[name].append(placement.columns.get(name))

    def drain(self) -> pa.RecordBatch:
        batch = pa.RecordBatch.from_pydict(self.columns, schema=self.base)
        if self.signal_columns:
            extra = signals.arrays_of(self.signals, self.signal_columns)
            batch = pa.RecordBatch.from_arrays([*batch.columns, *extra], schema=self.schema)
        self.columns = {name: [] for name in self.base.names}
        self.signals = []
        return batch


def _read_chunks(members: Iterable[Member]) -> Iterator[tuple[list, list[bytes]]]:
    """(members with their bytes, the readable bytes to inspect) per chunk."""
    for chunk in parallel.chunked(members, CHUNK_IMAGES):
        read = [(member, member.read() if member.read else None) for member in chunk]
        yield read, [data for _, data in read if data is not None]


@outputs.writes_output(inputs=("sources",))
def ingest_images(sources: Sequence[str], out_uri: str, config: IngestSettings) -> IngestResult:
    """Ingest every image under ``sources`` into a Parquet image dataset at ``out_uri``."""
    if not sources:
        raise LayoutError("ingest: no sources given")
    started = time.perf_counter()
    roots = [resolve_source(source) for source in sources]
    planned = known_sources.plan_sources(roots, config)
    join = _plan_signals(planned, config)
    optional = frozenset().union(*(source.columns for source in planned))
    schema = images_schema(optional, join.fields if join else ())
    out_uri = storage.normalize(out_uri)
    reader = SourceReader(config.max_image_bytes)
    members = itertools.chain.from_iterable(
        hf_members(source.hf_dataset)
        if source.hf_dataset
        else reader.members(source.read_from, source.layout)
        for source in planned
    )
    rejected: list[tuple[str, str]] = []
    distinct: set[str] = set()
    rows = _RowBuffer(schema, join.columns if join else ())
    uncaptioned = 0
    progress = tqdm(desc="ingest", unit="img", disable=None)
    with (
        progress,
        datasets.DatasetWriter(
            out_uri, schema, IMAGES_KIND, config.rows_per_shard, config.row_group_rows
        ) as writer,
    ):
        inspect = functools.partial(inspect_chunk, ImageLimits.of(config))
        inspected = parallel.map_chunks(inspect, _read_chunks(members), config.workers)
        for chunk, outcomes in inspected:
            readable = iter(outcomes)
            for member, data in chunk:
                if data is None:
                    rejected.append((member.source, member.rejected_reason or "unreadable"))
                    continue
                outcome = next(readable)
                if isinstance(outcome, str):
                    rejected.append((member.source, outcome))
                    continue
                values = None
                if join is not None:
                    values = join.values_for(
                        member.signals, outcome[0], member.source, member.relative_path
                    )
                    if isinstance(values, str):
                        rejected.append((member.source, values))
                        continue
                rows.add(member, data, *outcome, values)
                uncaptioned += member.placement.columns.get("captions") == []
                distinct.add(outcome[0])
                if len(rows) >= config.row_group_rows:
                    writer.write(rows.drain())
            progress.update(len(chunk))
        if len(rows):
            writer.write(rows.drain())
        if join is not None:
            join.check_matched()
        if writer.rows == 0:
            examples = "; ".join(f"{source}: {reason}" for source, reason in rejected[:3])
            raise LayoutError(f"{', '.join(roots)}: no readable images ({examples})")

        writer.seal()
        result = IngestResult(
            out_uri=out_uri,
            images=writer.rows,
            distinct_images=len(distinct),
            rejected=len(rejected),
            skipped_non_image=reader.skipped_non_image,
            shards=len(writer.shards),
            seconds=round(time.perf_counter() - started, 3),
        )
        coco_report = {}
        if any(source.kind == known_sources.COCO_KIND for source in planned):
            coco_report = {"coco_images_without_captions": uncaptioned}
        write_rejected(out_uri, rejected)
        storage.write_json(
            datasets.side_path(out_uri, REPORT_NAME),
            {
                **result.metrics(),
                **coco_report,
                **({"signals": join.report()} if join else {}),
                "rejected_examples": rejected[:20],
            },
        )
        for source in planned:
            if isinstance(source.layout, known_sources.ImageNetLayout):
                known_sources.write_imagenet_label_files(out_uri, source.layout.meta)
                break
        datasets.save_config(out_uri, "ingest", config)
        writer.finish(
            {
                "sources": roots,
                "source_kinds": [source.kind for source in planned],
                "split_dirnames": list(config.split_dirnames),
                **({"signals": join.report()} if join else {}),
            }
        )
    log.info(
        "ingested %d images (%d distinct) from %d source(s) into %d shard(s); %d rejected",
        result.images,
        result.distinct_images,
        len(roots),
        result.shards,
        result.rejected,
    )
    if uncaptioned:
        log.warning(
            "%d COCO image(s) have no caption in the annotations: kept with an empty captions list",
            uncaptioned,
        )
    if rejected:
        log.warning(
            "%d rejected file(s) (unreadable, or signals not whole) listed in %s",
            len(rejected),
            datasets.side_path(out_uri, REJECTED_NAME),
        )
    return result


def _plan_signals(
    planned: Sequence[known_sources.PlannedSource], config: IngestSettings
) -> SignalJoin | None:
    """The signals every image gets (side table, Hugging Face columns), or None."""
    in_sources = [
        (source.root, source.hf_dataset.signal_columns) for source in planned if source.hf_dataset
    ]
    return SignalJoin.plan(
        config.signals, config.signal_key, config.signal_columns, config.signal_length, in_sources
    )
