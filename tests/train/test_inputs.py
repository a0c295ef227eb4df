"""The training inputs, one value every launcher passes on: written as the command line's
arguments and read back by it, through JSON for the torchrun workers, by mode."""

import inspect
import json

from embedpipe.cli import build_parser
from embedpipe.cli.stages import train_arguments
from embedpipe.config import TrainSettings
from embedpipe.train.inputs import TrainInputs
from embedpipe.train.stage import train_model

ALL = TrainInputs("s3://b/images", "s3://b/splits", "s3://b/neg", "s3://b/emb", "s3://b/tax")


def test_the_command_line_reads_back_the_inputs_it_writes():
    for inputs in (ALL, TrainInputs("images"), TrainInputs("images", negatives="n")):
        argv = train_arguments(inputs, "s3://b/out", TrainSettings(lr=0.5, mode="head"))
        args = build_parser().parse_args(argv)
        assert TrainInputs.from_dict(vars(args)) == inputs
        assert (args.out, args.train__lr, args.train__mode) == ("s3://b/out", 0.5, "head")


def test_json_round_trip_and_the_stage_keywords():
    assert TrainInputs.from_dict(json.loads(json.dumps(ALL.to_dict()))) == ALL
    parameters = inspect.signature(train_model).parameters
    assert list(parameters)[:1] + list(ALL.keywords()) == [
        name for name in TrainInputs.parameters() if name in parameters
    ]
    assert TrainInputs("i", splits=None).keywords() == {
        "splits_uri": None, "negatives_uri": None, "embeddings_uri": None, "captions_uri": None,
    }  # fmt: skip


def test_only_a_head_reads_the_embeddings():
    assert ALL.for_mode("head") == ALL
    finetune = ALL.for_mode("finetune")
    assert finetune.embeddings == "" and finetune.keywords()["embeddings_uri"] is None
    assert "s3://b/emb" not in finetune.uris() and len(finetune.uris()) == 4
    assert "--embeddings" not in finetune.flags()
