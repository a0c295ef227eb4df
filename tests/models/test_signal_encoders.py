"""Signal encoders: registry entries built offline with seeded weights, per-sample
standardisation, AstroCLIP's overlapping slices, padding that changes nothing,
checkpoints that carry their entry, and a fixed length that refuses another."""

import json

import numpy as np
import pytest
import torch

from embedpipe.models.loading import checkpoint_entry, load_model, save_model
from embedpipe.models.registry import ModelEntry, ModelError, get_entry, listing_rows, load_registry
from embedpipe.models.signal_config import slice_count
from embedpipe.models.signal_encoders import slice_counts, slice_signals, standardize

SMALL = ("signal_transformer_small", "signal_cnn_small")


def tiny(architecture: str = "signal_transformer", embed_dim: int = 24, **arch) -> ModelEntry:
    defaults = {
        "signal_transformer": {
            "slice_length": 8,
            "slice_overlap": 3,
            "width": 32,
            "depth": 2,
            "heads": 4,
            "pool": "query",
        },
        "signal_cnn": {"channels": [8, 16], "kernel_size": 5, "stride": 2},
    }[architecture]
    return ModelEntry(
        name=f"tiny_{architecture}",
        library="signal",
        architecture=architecture,
        embed_dim=embed_dim,
        arch={**defaults, **arch},
    )


def encode(entry: ModelEntry, values, lengths=None, seed: int = 0) -> torch.Tensor:
    model = load_model(entry, "random", seed=seed)
    with torch.inference_mode():
        return model.module(torch.as_tensor(values, dtype=torch.float32), lengths)


def astroclip_slices(signal: np.ndarray, length: int, overlap: int) -> np.ndarray:
    """AstroCLIP's SpecFormer._slice, in numpy: a slice starting every length - overlap
    values below len - overlap, the last one zero-padded."""
    starts = np.arange(0, len(signal) - overlap, length - overlap)
    sections = [signal[start : start + length] for start in starts]
    return np.stack([np.pad(s, (0, length - len(s))) for s in sections])


def test_the_registry_declares_a_transformer_and_a_cnn_with_their_lengths():
    registry = load_registry()
    astroclip = registry["signal_transformer_astroclip"]
    assert astroclip.signal and astroclip.arch["slice_length"] == 20
    assert astroclip.arch["slice_overlap"] == 10 and astroclip.arch["signal_length"] == 7781
    assert registry["signal_cnn"].architecture == "signal_cnn"
    assert not registry["clip_vitb32"].signal
    rows = {row[0]: row for row in listing_rows(registry)}
    assert rows["signal_transformer_astroclip"][5:] == ["7781 values", "-", "signal"]
    assert rows["signal_cnn"][5] == "any length"


def test_a_bad_signal_entry_is_refused_naming_it_and_the_key():
    with pytest.raises(ModelError, match=r"\[models.bad\]: arch: slice_overlap 8 must be below"):
        fields = tiny().model_dump(exclude={"name"})
        load_registry({"bad": {**fields, "arch": {**fields["arch"], "slice_overlap": 8}}})
    with pytest.raises(ModelError, match=r"\[models.bad\]: arch: width: Field required"):
        arch = {"slice_length": 4, "depth": 1, "heads": 1}
        load_registry({"bad": {"library": "signal", "architecture": "signal_transformer",
                               "embed_dim": 8, "arch": arch}})  # fmt: skip
    with pytest.raises(ModelError, match="signal architecture 'lstm' is unknown"):
        load_registry({"bad": {"library": "signal", "architecture": "lstm", "embed_dim": 8}})
    with pytest.raises(ModelError, match="image_size: an image model needs image_size > 0"):
        load_registry({"bad": {"library": "open_clip", "architecture": "x", "embed_dim": 8}})


@pytest.mark.parametrize("name", SMALL)
def test_seeded_random_weights_are_reproducible_and_leave_the_global_rng_alone(name):
    entry = get_entry(name)
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    first = load_model(entry, "random", seed=7).module.state_dict()
    after = torch.rand(3)
    second = load_model(entry, "random", seed=7).module.state_dict()
    other = load_model(entry, "random", seed=8).module.state_dict()
    assert torch.equal(before, after)  # the caller's random stream went on untouched
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert any(not torch.equal(first[key], other[key]) for key in first if first[key].ndim > 1)


def test_standardisation_matches_numpy_per_sample_and_zeroes_padding():
    rng = np.random.default_rng(0)
    lengths = [50, 31, 7]
    values = np.zeros((3, 50), np.float32)
    for row, length in enumerate(lengths):
        values[row, :length] = rng.normal(3.0, 5.0, length)
        values[row, length:] = 1e6  # padding must not count
    out = standardize(torch.from_numpy(values), torch.tensor(lengths)).numpy()
    for row, length in enumerate(lengths):
        signal = values[row, :length].astype(np.float64)
        expected = (signal - signal.mean()) / signal.std()
        np.testing.assert_allclose(out[row, :length], expected, atol=1e-5)
        assert not out[row, length:].any()


@pytest.mark.parametrize("architecture", ["signal_transformer", "signal_cnn"])
def test_an_affine_change_of_a_signal_leaves_its_embedding_unchanged(architecture):
    entry = tiny(architecture)
    signals = np.random.default_rng(1).normal(size=(4, 61)).astype(np.float32)
    scaled = 250.0 * signals - 40.0  # other units, another zero point
    np.testing.assert_allclose(encode(entry, scaled), encode(entry, signals), atol=1e-4)
    assert not torch.allclose(encode(entry, signals[:, ::-1].copy()), encode(entry, signals))


@pytest.mark.parametrize(
    ("length", "slice_length", "overlap"),
    [(61, 8, 3), (64, 8, 0), (8, 8, 3), (9, 8, 3), (7781, 20, 10), (100, 16, 15)],
)
def test_overlapping_slices_are_astroclips_and_cover_the_signal(length, slice_length, overlap):
    signal = np.random.default_rng(length).normal(size=length).astype(np.float32)
    expected = astroclip_slices(signal, slice_length, overlap)
    lengths = torch.tensor([length])
    counts = slice_counts(lengths, slice_length, overlap)
    sliced = slice_signals(torch.from_numpy(signal)[None], counts, slice_length, overlap)[0]
    np.testing.assert_array_equal(sliced.numpy(), expected)
    assert int(counts[0]) == slice_count(length, slice_length, overlap) == len(expected)
    step = slice_length - overlap
    covered = np.zeros(length, bool)
    for number in range(len(expected)):
        covered[number * step : number * step + slice_length] = True
    assert covered.all()


@pytest.mark.parametrize(
    ("architecture", "pool"),
    [("signal_transformer", "query"), ("signal_transformer", "mean"), ("signal_cnn", None)],
)
def test_forward_shapes_and_a_padded_batch_equals_each_signal_alone(architecture, pool):
    entry = tiny(architecture, **({"pool": pool} if pool else {}))
    rng = np.random.default_rng(2)
    lengths = [90, 8, 41, 57]
    batch = np.zeros((4, 90), np.float32)
    for row, length in enumerate(lengths):
        batch[row, :length] = rng.normal(size=length)
    together = encode(entry, batch, torch.tensor(lengths))
    assert together.shape == (4, entry.embed_dim) and together.dtype == torch.float32
    for row, length in enumerate(lengths):
        alone = encode(entry, batch[row : row + 1, :length])
        np.testing.assert_allclose(together[row : row + 1], alone, atol=1e-5)


def test_a_checkpoint_carries_its_entry_and_reloads_the_same_encoder(tmp_path):
    entry = tiny("signal_transformer", signal_length=40)
    model = load_model(entry, "random", seed=3)
    folder = save_model(model, str(tmp_path / "ckpt"))
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert saved["entry"] == entry.model_dump(mode="json")
    carried = checkpoint_entry(folder)  # --weights CKPT needs no --model
    assert carried == entry
    reloaded = load_model(carried, folder)
    signals = torch.randn(3, 40)
    with torch.inference_mode():
        torch.testing.assert_close(reloaded.module(signals), model.module(signals))
    with pytest.raises(ModelError, match="checkpoint of tiny_signal_transformer"):
        load_model(tiny("signal_transformer", signal_length=40, depth=1), folder)


def test_a_fixed_length_encoder_refuses_another_length_in_one_line():
    module = load_model(tiny(signal_length=40), "random").module
    module.check_length(40, "data.parquet: column 'flux'")
    with pytest.raises(ModelError) as refused:
        module.check_length(39, "data.parquet: column 'flux'", "tiny")
    assert str(refused.value) == (
        "data.parquet: column 'flux': signals of length 39, but tiny takes signals of "
        "length 40 only"
    )
    variable = load_model(tiny(), "random").module  # any length from one slice up
    variable.check_length(8, "x")
    variable.check_length(5000, "x")
    with pytest.raises(ModelError, match="length 7 is shorter than the encoder's minimum 8"):
        variable.check_length(7, "x")


def test_signal_encoders_take_no_pixels_and_no_random_free_weights():
    model = load_model(get_entry("signal_cnn_small"), "random")
    with pytest.raises(ModelError, match="takes signals, not images"):
        model.encode_images(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ModelError, match="has no pretrained weights"):
        load_model(get_entry("signal_cnn_small"))


def test_bf16_weights_embed_close_to_fp32():
    from embedpipe.models.precision import precision_for

    entry = tiny()
    signals = torch.randn(2, 50)
    exact = encode(entry, signals)
    module = load_model(entry, "random").module
    precision_for("bf16", torch.device("cpu")).cast(module)
    with torch.inference_mode():
        low = module(signals).float()
    assert low.shape == exact.shape
    cosine = torch.nn.functional.cosine_similarity(low, exact)
    assert (cosine > 0.98).all()
