"""embedpipe.train.losses against open_clip's ClipLoss and SigLipLoss, in one and two processes."""

from __future__ import annotations

import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from losses_dist_worker import CASES, open_clip_loss_module

from embedpipe.train import losses

WORKER = pathlib.Path(__file__).with_name("losses_dist_worker.py")
WORLD_SIZE = 2
PER_RANK = 4
TOLERANCE = {"rtol": 1e-9, "atol": 1e-9}


@pytest.fixture(scope="module")
def open_clip_loss():
    return open_clip_loss_module()


def features(batch: int, dim: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim, generator=generator, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(batch, dim, generator=generator, dtype=torch.float64), dim=-1)
    # Each text leans towards its image, so positives and negatives differ as in training.
    return image, F.normalize(text + image, dim=-1)


def value_and_grads(loss, image, text, *args, **kwargs):
    image = image.clone().requires_grad_(True)
    text = text.clone().requires_grad_(True)
    value = loss(image, text, *args, **kwargs)
    value.backward()
    return value.detach(), image.grad, text.grad


def assert_same(actual, expected):
    for got, wanted in zip(actual, expected, strict=True):
        torch.testing.assert_close(got, wanted, **TOLERANCE)


SCALE = torch.tensor(10.0, dtype=torch.float64)
BIAS = torch.tensor(-10.0, dtype=torch.float64)


@pytest.mark.parametrize("bias", [None, BIAS])
def test_infonce_equals_open_clip_clip_loss(open_clip_loss, bias):
    image, text = features(8)
    ours = value_and_grads(losses.get_loss("infonce"), image, text, SCALE, bias)
    theirs = value_and_grads(open_clip_loss.ClipLoss(), image, text, SCALE, bias)
    assert_same(ours, theirs)


@pytest.mark.parametrize("bias", [None, BIAS])
def test_pairwise_sigmoid_equals_open_clip_siglip_loss(open_clip_loss, bias):
    image, text = features(8)
    ours = value_and_grads(losses.get_loss("pairwise_sigmoid"), image, text, SCALE, bias)
    theirs = value_and_grads(open_clip_loss.SigLipLoss(), image, text, SCALE, bias)
    assert_same(ours, theirs)


def test_float32_matches_open_clip_within_1e_6(open_clip_loss):
    image, text = (part.float() for part in features(32))
    for ours, theirs, bias in (
        (losses.get_loss("infonce"), open_clip_loss.ClipLoss(), None),
        (losses.get_loss("pairwise_sigmoid"), open_clip_loss.SigLipLoss(), -10.0),
    ):
        torch.testing.assert_close(
            ours(image, text, 10.0, bias), theirs(image, text, 10.0, bias), rtol=1e-6, atol=1e-6
        )


def test_upweighted_positives_with_weight_1_equal_pairwise_sigmoid():
    image, text = features(8)
    pairwise = value_and_grads(losses.get_loss("pairwise_sigmoid"), image, text, SCALE, BIAS)
    upweighted = losses.get_loss("pairwise_sigmoid_upwtdpos", pos_weight=1.0)
    assert_same(value_and_grads(upweighted, image, text, SCALE, BIAS), pairwise)
    # 1.0 is the default.
    assert_same(
        value_and_grads(losses.get_loss("pairwise_sigmoid_upwtdpos"), image, text, SCALE, BIAS),
        pairwise,
    )


def test_pos_weight_scales_only_the_positive_terms():
    image, text = features(8)
    pairwise = losses.get_loss("pairwise_sigmoid")(image, text, SCALE, BIAS)
    upweighted = losses.get_loss("pairwise_sigmoid_upwtdpos", pos_weight=3.0)(
        image, text, SCALE, BIAS
    )
    positive_terms = -F.logsigmoid(SCALE * (image * text).sum(dim=1) + BIAS)
    expected = pairwise + (3.0 - 1.0) * positive_terms.sum() / image.shape[0]
    torch.testing.assert_close(upweighted, expected, **TOLERANCE)


def test_multipos_with_distinct_labels_equals_pairwise_sigmoid():
    image, text = features(8)
    labels = torch.tensor([7, 3, 0, 12, 5, 1, 9, 4])
    pairwise = value_and_grads(losses.get_loss("pairwise_sigmoid"), image, text, SCALE, BIAS)
    multipos = value_and_grads(
        losses.get_loss("multipos_sigmoid"), image, text, SCALE, BIAS, labels=labels
    )
    assert_same(multipos, pairwise)
    weighted = losses.get_loss("multipos_sigmoid", pos_weight=2.5)
    upweighted = losses.get_loss("pairwise_sigmoid_upwtdpos", pos_weight=2.5)
    torch.testing.assert_close(
        weighted(image, text, SCALE, BIAS, labels=labels),
        upweighted(image, text, SCALE, BIAS),
        **TOLERANCE,
    )


def test_multipos_counts_every_same_label_pair_as_positive():
    image, text = features(4)
    labels = torch.tensor([2, 5, 2, 8])
    signs = torch.tensor(
        [[1, -1, 1, -1], [-1, 1, -1, -1], [1, -1, 1, -1], [-1, -1, -1, 1]], dtype=torch.float64
    )
    weights = torch.where(signs > 0, 1.5, 1.0).double()
    logits = SCALE * image @ text.T + BIAS
    expected = -(weights * F.logsigmoid(signs * logits)).sum() / 4
    loss = losses.get_loss("multipos_sigmoid", pos_weight=1.5)
    torch.testing.assert_close(loss(image, text, SCALE, BIAS, labels=labels), expected, **TOLERANCE)
    # Plain lists of labels work too.
    torch.testing.assert_close(
        loss(image, text, SCALE, BIAS, labels=labels.tolist()), expected, **TOLERANCE
    )


def test_multipos_without_labels_is_an_error_naming_it():
    image, text = features(4)
    with pytest.raises(ValueError, match="multipos_sigmoid needs labels"):
        losses.get_loss("multipos_sigmoid")(image, text, SCALE, BIAS)
    with pytest.raises(ValueError, match="multipos_sigmoid: labels must be 4 integers"):
        losses.get_loss("multipos_sigmoid")(image, text, SCALE, BIAS, labels=torch.tensor([1, 2]))


def test_triplet_equals_torch_triplet_margin_loss():
    anchor, positive = features(8)
    negative, _ = features(8, seed=1)
    loss = losses.get_loss("triplet", margin=0.3)
    expected = F.triplet_margin_loss(anchor, positive, negative, margin=0.3)
    # The scale and bias are ignored.
    for scale, bias in ((None, None), (SCALE, BIAS)):
        torch.testing.assert_close(
            loss(anchor, positive, scale, bias, negative_features=negative), expected, **TOLERANCE
        )
    default = F.triplet_margin_loss(anchor, positive, negative)
    torch.testing.assert_close(
        losses.get_loss("triplet")(anchor, positive, None, negative_features=negative), default
    )
    with pytest.raises(ValueError, match="triplet needs negative_features"):
        loss(anchor, positive, None)


def gradcheck_inputs(name: str):
    image, text = (part.requires_grad_(True) for part in features(4, dim=3))
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    negative = features(4, dim=3, seed=2)[0].requires_grad_(True)
    if name == "triplet":
        return (image, text, negative), lambda loss, i, t, n: loss(i, t, None, negative_features=n)
    if name == "infonce":
        return (image, text, scale), lambda loss, i, t, s: loss(i, t, s)
    labels = torch.tensor([0, 1, 0, 2])
    return (image, text, scale, bias), lambda loss, i, t, s, b: loss(i, t, s, b, labels=labels)


@pytest.mark.parametrize("name", losses.list_losses())
def test_gradients_match_finite_differences(name):
    options = {"pos_weight": 2.0} if "pos_weight" in losses.loss_options(name) else {}
    loss = losses.get_loss(name, **options)
    inputs, call = gradcheck_inputs(name)
    assert torch.autograd.gradcheck(lambda *args: call(loss, *args), inputs)


def test_registry_lists_every_loss_and_what_it_needs():
    assert losses.list_losses() == [
        "infonce",
        "multipos_sigmoid",
        "pairwise_sigmoid",
        "pairwise_sigmoid_upwtdpos",
        "triplet",
    ]
    assert [name for name in losses.list_losses() if losses.needs_labels(name)] == [
        "multipos_sigmoid"
    ]
    assert [name for name in losses.list_losses() if losses.needs_negatives(name)] == ["triplet"]
    for name in ("pairwise_sigmoid", "pairwise_sigmoid_upwtdpos", "multipos_sigmoid"):
        assert losses.init_logit_scale(name) == pytest.approx(math.log(10))
        assert losses.init_logit_bias(name) == -10.0
    assert losses.init_logit_scale("infonce") == pytest.approx(math.log(1 / 0.07))
    assert losses.init_logit_bias("infonce") is None
    assert losses.init_logit_scale("triplet") is None
    assert losses.loss_options("triplet")["margin"] == 1.0
    for name in losses.list_losses():
        assert {"rank", "world_size", "local_loss", "gather_with_grad"} <= set(
            losses.loss_options(name)
        )


def test_unknown_loss_or_option_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"unknown loss 'clip'; known losses: infonce, multipos"):
        losses.get_loss("clip")
    with pytest.raises(ValueError, match=r"unknown loss 'clip'"):
        losses.needs_labels("clip")
    with pytest.raises(ValueError, match=r"loss infonce has no option pos_weight; its options: "):
        losses.get_loss("infonce", pos_weight=2.0)
    with pytest.raises(ValueError, match=r"loss triplet has no option pos_weight"):
        losses.get_loss("triplet", pos_weight=2.0)


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("multipos_sigmoid", {"pos_weight": 0}, "pos_weight must be a positive number"),
        ("pairwise_sigmoid_upwtdpos", {"pos_weight": "2"}, "pos_weight must be a positive"),
        ("triplet", {"margin": -0.1}, "margin must be a number >= 0"),
        ("infonce", {"rank": 2, "world_size": 2}, "need 0 <= rank < world_size"),
        ("infonce", {"local_loss": 1}, "local_loss must be true or false"),
    ],
)
def test_bad_option_values_are_errors_naming_them(name, options, message):
    with pytest.raises(ValueError, match=f"loss {name}: .*{message}"):
        losses.get_loss(name, **options)


def test_contrastive_losses_refuse_separate_negatives():
    image, text = features(4)
    with pytest.raises(ValueError, match="infonce takes no negative_features"):
        losses.get_loss("infonce")(image, text, SCALE, negative_features=text)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Runs every case of the worker in two gloo processes; returns the inputs and results."""
    folder = tmp_path_factory.mktemp("losses_dist")
    image, text = features(WORLD_SIZE * PER_RANK, seed=3)
    # Rows 1 (rank 0) and 5 (rank 1) share a label: a positive only if labels cross ranks.
    labels = torch.tensor([10, 11, 12, 13, 14, 11, 16, 17])
    inputs = {
        "image": image,
        "text": text,
        "labels": labels,
        "scale": SCALE,
        "bias": BIAS,
        "per_rank": PER_RANK,
    }
    torch.save(inputs, folder / "inputs.pt")
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                str(rank),
                str(WORLD_SIZE),
                str(folder / "rendezvous"),
                str(folder / "inputs.pt"),
                str(folder / f"rank{rank}.pt"),
            ],
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(WORLD_SIZE)
    ]
    for rank, process in enumerate(processes):
        output, _ = process.communicate(timeout=180)
        assert process.returncode == 0, f"rank {rank} failed:\n{output}"
    results = [
        torch.load(folder / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)
    ]
    return inputs, results


def rank_rows(rank: int) -> slice:
    return slice(rank * PER_RANK, (rank + 1) * PER_RANK)


@pytest.mark.parametrize("case", [case for case, (_, theirs) in CASES.items() if theirs])
def test_two_processes_equal_open_clip_in_two_processes(two_ranks, case):
    _, results = two_ranks
    for rank_results in results:
        for key in ("loss", "image_grad", "text_grad"):
            torch.testing.assert_close(
                rank_results[case][key], rank_results[f"{case}/open_clip"][key], **TOLERANCE
            )


def full_batch(inputs, loss, **kwargs):
    bias = None if isinstance(loss, losses.InfoNCELoss) else inputs["bias"]
    return value_and_grads(loss, inputs["image"], inputs["text"], inputs["scale"], bias, **kwargs)


def assert_ranks_split_the_global_loss(results, case, expected):
    """Per-rank (local) losses average to the global loss; their gradients sum to its gradient
    times the world size, as open_clip's local losses under DDP's gradient averaging."""
    value, image_grad, text_grad = expected
    mean = sum(rank_results[case]["loss"] for rank_results in results) / WORLD_SIZE
    torch.testing.assert_close(mean, value, **TOLERANCE)
    for rank, rank_results in enumerate(results):
        rows = rank_rows(rank)
        torch.testing.assert_close(
            rank_results[case]["image_grad"], WORLD_SIZE * image_grad[rows], **TOLERANCE
        )
        torch.testing.assert_close(
            rank_results[case]["text_grad"], WORLD_SIZE * text_grad[rows], **TOLERANCE
        )


def assert_every_rank_computes_the_global_loss(results, case, expected):
    value, image_grad, text_grad = expected
    for rank, rank_results in enumerate(results):
        torch.testing.assert_close(rank_results[case]["loss"], value, **TOLERANCE)
        rows = rank_rows(rank)
        torch.testing.assert_close(rank_results[case]["image_grad"], image_grad[rows], **TOLERANCE)
        torch.testing.assert_close(rank_results[case]["text_grad"], text_grad[rows], **TOLERANCE)


def test_two_processes_match_one_process_with_the_whole_batch(two_ranks, open_clip_loss):
    inputs, results = two_ranks
    clip = full_batch(inputs, open_clip_loss.ClipLoss())
    assert_every_rank_computes_the_global_loss(results, "infonce", clip)
    assert_ranks_split_the_global_loss(results, "infonce_local_with_grad", clip)
    siglip = full_batch(inputs, open_clip_loss.SigLipLoss())
    assert_ranks_split_the_global_loss(results, "pairwise_sigmoid", siglip)
    assert_ranks_split_the_global_loss(results, "upwtdpos_weight_1", siglip)


def test_multipos_pair_split_across_ranks_is_a_positive(two_ranks):
    inputs, results = two_ranks
    multipos = losses.get_loss("multipos_sigmoid", pos_weight=2.0)
    expected = full_batch(inputs, multipos, labels=inputs["labels"])
    assert_ranks_split_the_global_loss(results, "multipos", expected)
    assert_every_rank_computes_the_global_loss(results, "multipos_global", expected)
    # The shared label matters: counted as a negative, the loss would differ.
    distinct = full_batch(inputs, multipos, labels=torch.arange(WORLD_SIZE * PER_RANK))
    assert not torch.isclose(distinct[0], expected[0], rtol=1e-3)
