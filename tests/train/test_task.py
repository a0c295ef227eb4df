"""Both training tasks answer everything the loop asks, with the protocol's signatures."""

import inspect

import pytest

from embedpipe.train.finetune import FinetuneTask
from embedpipe.train.head import HeadTask
from embedpipe.train.task import TrainingTask

METHODS = [
    name
    for name, value in vars(TrainingTask).items()
    if not name.startswith("_") and inspect.isfunction(value)
]


def test_the_protocol_names_every_hook_the_loop_used_to_look_up():
    hooks = {"after_step", "training_weights", "load_training_weights", "extra_state"}
    assert hooks | {"load_extra_state", "summary", "param_groups", "evaluate"} <= set(METHODS)
    assert set(TrainingTask.__annotations__) == {"module", "train_rows", "queries"}


@pytest.mark.parametrize("task", [FinetuneTask, HeadTask])
def test_each_task_has_every_method_of_the_protocol(task):
    for name in METHODS:
        wanted = inspect.signature(getattr(TrainingTask, name)).parameters
        got = inspect.signature(getattr(task, name)).parameters
        assert list(got) == list(wanted), f"{task.__name__}.{name}"
