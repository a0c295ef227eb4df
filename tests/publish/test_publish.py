"""publish: reloading through open_clip and transformers themselves, the model card, and
the push against a loopback server answering the Hub endpoints (no network)."""

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import open_clip
import pytest
import torch
import yaml
from conftest import jpeg_bytes, lock_held_elsewhere, write_tree
from PIL import Image
from safetensors.torch import load_file

from embedpipe.cli import main
from embedpipe.config import DedupSettings, IngestSettings, PublishSettings
from embedpipe.core import datasets
from embedpipe.data.dedup import find_duplicates
from embedpipe.data.ingest import ingest_images
from embedpipe.models.heads import ProjectionHead, load_head_checkpoint, save_head_checkpoint
from embedpipe.models.loading import entry_for_weights, load_model, save_model
from embedpipe.models.registry import ModelError
from embedpipe.publish.stage import publish_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tiny_entry, tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_model(load_model(tiny_entry, "random"), str(path))
    config = json.loads((path / "config.json").read_text())
    config["train"] = {"epochs": 3, "lr": 0.0005, "data": {"train": "s3://bucket/kept"}}
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def small_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    files = {
        f"{split}/birds/{concept}/{i}.jpg": jpeg_bytes((40 * i, 90, 200 - 30 * i), (60 + i, 50))
        for split in ("train", "test")
        for concept in ("robin", "wren")
        for i in range(3)
    }
    files["train/birds/robin/copy.jpg"] = files["test/birds/robin/0.jpg"]  # a leak
    write_tree(root / "src", files)
    out = root / "images"
    ingest_images([str(root / "src")], str(out), IngestSettings(workers=1))
    return str(out)


def _embed(model, preprocess, images):
    with torch.no_grad():
        return model.encode_image(torch.stack([preprocess(i) for i in images])).numpy()


def _images(count=3):
    rng = np.random.default_rng(1)
    return [
        Image.fromarray(rng.integers(0, 256, (70, 90 + 10 * i, 3), dtype=np.uint8))
        for i in range(count)
    ]


def test_published_model_reloads_through_open_clip_with_the_same_embeddings(
    checkpoint, tiny_entry, tmp_path
):
    out = tmp_path / "published"
    result = publish_checkpoint(str(checkpoint), str(out), PublishSettings(license="mit"))
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "open_clip_config.json",
        "open_clip_model.safetensors",
    ]
    assert result.max_difference <= 1e-6 and result.kind == "open_clip"
    published = json.loads((out / "open_clip_config.json").read_text())
    assert published["model_cfg"]["vision_cfg"] == {
        "image_size": 64,
        "layers": 2,
        "width": 128,
        "patch_size": 32,
    }
    assert published["preprocess_cfg"]["mean"] == pytest.approx(list(tiny_entry.mean))

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    model.eval()
    ours = load_model(tiny_entry, str(checkpoint))
    images = _images()
    expected = _embed(ours.module, ours.transform, images)
    np.testing.assert_allclose(_embed(model, preprocess, images), expected, atol=1e-5)
    tokens = open_clip.get_tokenizer(f"local-dir:{out}")(["a robin"])
    with torch.no_grad():
        np.testing.assert_allclose(
            model.encode_text(tokens).numpy(),
            ours.encode_texts(["a robin"]).numpy(),
            atol=1e-5,
        )
    state = load_file(str(out / "open_clip_model.safetensors"))
    assert result.parameters == sum(t.numel() for t in state.values()) == 7_532_545


def test_model_card_has_hub_header_lineage_training_evaluation_and_size(
    checkpoint, small_images, tmp_path
):
    dedup = tmp_path / "dedup"
    find_duplicates(small_images, str(dedup), DedupSettings())
    metrics = tmp_path / "metrics.json"
    metrics.write_text(
        json.dumps(
            {"imagenet": {"acc1": 0.25, "acc5": 0.5}, "coco": {"image_retrieval_recall@5": 0.125}}
        )
    )
    out = tmp_path / "published"
    config = PublishSettings(license="apache-2.0", tags=("birds",), datasets=("org/birds",))
    publish_checkpoint(str(checkpoint), str(out), config, str(metrics), [small_images, str(dedup)])

    text = (out / "README.md").read_text()
    _, header, body = text.split("---\n", 2)
    meta = yaml.safe_load(header)
    assert meta["library_name"] == "open_clip"
    assert meta["license"] == "apache-2.0"
    assert meta["pipeline_tag"] == "zero-shot-image-classification"
    assert meta["datasets"] == ["org/birds"]
    assert {"open_clip", "embedpipe", "birds"} <= set(meta["tags"])
    results = meta["model-index"][0]["results"]
    found = {(r["dataset"]["name"], m["type"]): m["value"] for r in results for m in r["metrics"]}
    assert found == {
        ("imagenet", "acc1"): 0.25,
        ("imagenet", "acc5"): 0.5,
        ("coco", "image_retrieval_recall@5"): 0.125,
    }
    manifest = datasets.read_manifest(small_images)
    assert f"`images` (images, {manifest['rows']} rows)" in body
    assert manifest["sources"][0].endswith("/src") and "source: `src`" in body
    assert "images per split: test: 6, train: 7" in body
    assert "groups spanning splits (leakage): 1" in body
    assert "| epochs | 3 |" in body and "| data.train | kept |" in body
    # lineage, sources and settings name no local path and no bucket (issue 24, item 10)
    assert str(tmp_path.parent) not in text and "s3://" not in text
    assert "| coco | image_retrieval_recall@5 | 0.1250 |" in body
    assert "- parameters: 7,532,545" in body
    assert "- weights stored as float32: 30,130,180 bytes" in body
    assert "unknown" not in body  # every piece was given


def test_card_says_what_is_unknown(checkpoint, tmp_path):
    publish_checkpoint(str(checkpoint), str(tmp_path / "p"), PublishSettings())
    body = (tmp_path / "p" / "README.md").read_text()
    assert "Source URIs, counts, splits, duplicates and leakage: unknown" in body
    assert "Evaluation: unknown" in body
    assert "model-index" not in body


def test_a_publish_into_a_folder_another_run_is_writing_is_refused(checkpoint, tmp_path):
    from embedpipe.core.locks import OutputLockedError

    out = tmp_path / "p"
    with lock_held_elsewhere(out) as (pid, _):
        with pytest.raises(OutputLockedError, match=f"pid {pid}"):
            publish_checkpoint(str(checkpoint), str(out), PublishSettings())
        assert sorted(p.name for p in out.rglob("*")) == [".embedpipe", "lock"]
    publish_checkpoint(str(checkpoint), str(out), PublishSettings())
    assert not (out / ".embedpipe").exists()  # the published folder is only the model's files


def test_reload_check_fails_when_published_config_disagrees_with_the_weights(checkpoint, tmp_path):
    # A model_cfg that builds another network from the same tensors (QuickGELU).
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in checkpoint.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    config = json.loads((broken / "config.json").read_text())
    config["model_cfg"]["quick_gelu"] = True
    (broken / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="differ from the checkpoint's"):
        publish_checkpoint(str(broken), str(out), PublishSettings())
    assert not out.exists()


def test_not_a_checkpoint_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["publish", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert "not an embedpipe checkpoint (no config.json)" in err and "\n" not in err


@pytest.fixture(scope="module")
def head_checkpoint(tiny_entry, tmp_path_factory):
    torch.manual_seed(0)
    head = ProjectionHead(in_dim=64, out_dim=16, width=32, depth=3)
    path = tmp_path_factory.mktemp("head") / "ckpt"
    save_head_checkpoint(
        head, tiny_entry, str(path), {"train": {"epochs": 2}}, weights="random", seed=3
    )
    return path


def test_head_checkpoint_round_trips(tiny_entry, tmp_path):
    torch.manual_seed(1)
    head = ProjectionHead(in_dim=64, out_dim=8, depth=2, activation="relu", normalize=False)
    save_head_checkpoint(head, tiny_entry, str(tmp_path / "h"), {"train": {"epochs": 2}})
    loaded, backbone, config = load_head_checkpoint(str(tmp_path / "h"))
    assert backbone == tiny_entry
    assert config["head"]["depth"] == 2 and config["train"] == {"epochs": 2}
    inputs = torch.randn(4, 64)
    with torch.no_grad():
        assert torch.equal(loaded(inputs), head(inputs))


@pytest.mark.parametrize(
    ("weights", "seed", "said"),
    [
        ("random", 5, "random (seed 5)"),
        ("laion2b_s34b_b79k", 0, "laion2b_s34b_b79k"),
        ("s3://private-bucket/team/backbone-ft", 0, "a checkpoint named backbone-ft"),
        ("/home/someone/runs/backbone-ft", 0, "a checkpoint named backbone-ft"),
    ],
)
def test_the_card_of_a_head_names_the_weights_its_backbone_embedded_with(
    tiny_entry, weights, seed, said
):
    from embedpipe.publish.stage import _backbone_weights

    assert _backbone_weights({"weights": weights, "seed": seed}, tiny_entry) == said


def test_a_published_heads_card_says_what_it_takes_returns_and_needs(head_checkpoint, tmp_path):
    publish_checkpoint(str(head_checkpoint), str(tmp_path / "out"), PublishSettings())
    text = (tmp_path / "out" / "README.md").read_text()
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "image-feature-extraction"
    assert "Takes an RGB picture of any size" in text
    assert "resizes its shortest side to 64 px and centre-crops it, bicubic" in text
    assert "returns one L2-normalised 16-d embedding per picture" in text
    assert "weights `random (seed 3)`" in text and "`open_clip_torch`" in text
    assert "- parameters: 802,896" in text  # the image tower and the head
    assert str(tmp_path.parent) not in text


# --- the Hub, on loopback --------------------------------------------------------------


class FakeHub:
    """Answers the endpoints HfApi.create_repo and upload_folder call; records the rest."""

    def __init__(self, failing_commits=0):
        # Answer the first N commits with a 507, which huggingface_hub does not retry itself.
        self.failing_commits = failing_commits
        self.created = []
        self.commits = []
        self.unexpected = []
        self.auth = set()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, payload, status=200):
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hub.auth.add(self.headers.get("Authorization"))
                path = self.path.split("?")[0]
                if path == "/api/repos/create":
                    request = json.loads(data)
                    hub.created.append(request)
                    repo = f"{request['organization']}/{request['name']}"
                    return self._reply({"url": f"{hub.endpoint}/{repo}"})
                if path == "/api/validate-yaml":
                    return self._reply({})
                if "/preupload/" in path:
                    files = json.loads(data)["files"]
                    return self._reply(
                        {
                            "files": [
                                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                for f in files
                            ]
                        }
                    )
                if "/commit/" in path and hub.failing_commits:
                    hub.failing_commits -= 1
                    return self._reply({"error": "Insufficient Storage"}, 507)
                if "/commit/" in path:
                    lines = [json.loads(line) for line in data.splitlines() if line.strip()]
                    hub.commits.append((path, lines))
                    repo = path.removeprefix("/api/models/").split("/commit/")[0]
                    oid = "a" * 40
                    return self._reply(
                        {"commitUrl": f"{hub.endpoint}/{repo}/commit/{oid}", "commitOid": oid}
                    )
                hub.unexpected.append(("POST", self.path))
                self._reply({"error": "not here"}, 404)

            def do_GET(self):
                hub.unexpected.append(("GET", self.path))
                self._reply({"error": "not here"}, 404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def files(self) -> dict[str, bytes]:
        ((_, lines),) = self.commits
        return {
            line["value"]["path"]: base64.b64decode(line["value"]["content"])
            for line in lines
            if line["key"] == "file"
        }


@pytest.fixture
def hub(monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)  # loopback only
    server = FakeHub()
    yield server
    server.server.shutdown()
    server.server.server_close()


@pytest.fixture
def small_checkpoint(tmp_path):
    """Small enough that every file goes as a regular (non-LFS) upload."""
    from embedpipe.models.registry import ModelEntry

    entry = ModelEntry(
        name="micro",
        library="open_clip",
        architecture="embedpipe-micro",
        embed_dim=8,
        image_size=32,
        open_clip_config={
            "embed_dim": 8,
            "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
            "text_cfg": {
                "context_length": 8,
                "vocab_size": 49408,
                "width": 16,
                "heads": 1,
                "layers": 1,
            },
        },
    )
    torch.manual_seed(0)
    path = tmp_path / "micro"
    save_model(load_model(entry, "random"), str(path))
    return path


def test_push_uploads_every_published_file(small_checkpoint, hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    out = tmp_path / "published"
    config = PublishSettings(
        push="org/micro", hub_endpoint=hub.endpoint, private=True, commit_message="v1"
    )
    result = publish_checkpoint(str(small_checkpoint), str(out), config)
    assert hub.unexpected == []
    assert hub.created == [{"name": "micro", "organization": "org", "visibility": "private"}]
    ((path, lines),) = hub.commits
    assert path == "/api/models/org/micro/commit/main"
    assert lines[0]["value"]["summary"] == "v1"
    assert hub.files() == {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(hub.files()) == {"README.md", "open_clip_config.json", "open_clip_model.safetensors"}
    assert hub.auth == {"Bearer hf_test_token"}
    assert result.pushed.startswith(hub.endpoint)
    assert (
        'open_clip.create_model_and_transforms("hf-hub:org/micro")'
        in hub.files()["README.md"].decode()
    )


def test_a_push_retried_after_a_failure_makes_one_whole_commit(
    small_checkpoint, tmp_path, monkeypatch
):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)  # loopback only
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    hub = FakeHub(failing_commits=1)
    try:
        out = tmp_path / "published"
        config = PublishSettings(push="org/micro", hub_endpoint=hub.endpoint)
        with pytest.raises(RuntimeError, match=r"push to org/micro: .*507.*rerun the same publish"):
            publish_checkpoint(str(small_checkpoint), str(out), config)
        assert hub.commits == []  # the failed commit left nothing in the repository
        written = {p.name: p.read_bytes() for p in out.iterdir()}
        publish_checkpoint(str(small_checkpoint), str(out), config)  # the retry
        assert len(hub.commits) == 1  # one commit holding every file, once
        assert hub.files() == written == {p.name: p.read_bytes() for p in out.iterdir()}
        paths = [line["value"]["path"] for line in hub.commits[0][1] if line["key"] == "file"]
        assert sorted(paths) == sorted(set(paths))
    finally:
        hub.server.shutdown()
        hub.server.server_close()


def test_an_invalid_repo_id_fails_before_anything_is_written(small_checkpoint, tmp_path, capsys):
    out = tmp_path / "p"
    argv = ["publish", str(small_checkpoint), "--out", str(out), "--push", "org/na..me"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert "--push 'org/na..me': not a valid Hub repo id (Cannot have -- or .." in err
    assert "\n" not in err and not out.exists()


def test_push_reads_the_token_from_a_mounted_secret_file(
    small_checkpoint, hub, tmp_path, monkeypatch
):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    secret = tmp_path / "token"
    secret.write_text("hf_from_secret\n")
    config = PublishSettings(push="org/micro", hub_endpoint=hub.endpoint, token_file=str(secret))
    publish_checkpoint(str(small_checkpoint), str(tmp_path / "p"), config)
    assert hub.auth == {"Bearer hf_from_secret"}


def test_push_without_a_token_fails_before_anything_is_sent_or_written(
    small_checkpoint, hub, tmp_path, monkeypatch, capsys
):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    out = tmp_path / "p"
    argv = ["publish", str(small_checkpoint), "--out", str(out), "--push", "org/micro"]
    assert main([*argv, "--hub-endpoint", hub.endpoint]) == 1
    err = capsys.readouterr().err.strip()
    assert "no Hub token; set HF_TOKEN or [publish].token_file" in err and "\n" not in err
    assert hub.created == hub.commits == hub.unexpected == []
    assert not out.exists()


def test_push_in_offline_mode_fails_at_once(small_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE is set"):
        publish_checkpoint(str(small_checkpoint), str(tmp_path / "p"), PublishSettings(push="o/m"))
    assert not (tmp_path / "p").exists()


# --- embedding with a published model --------------------------------------------------


def test_embed_with_local_dir_weights_needs_no_registry_entry(
    checkpoint, tiny_entry, small_images, tmp_path, capsys
):
    out = tmp_path / "published"
    publish_checkpoint(str(checkpoint), str(out), PublishSettings())
    entry = entry_for_weights(f"local-dir:{out}")
    assert (entry.name, entry.embed_dim, entry.image_size, entry.text) == (
        "published",
        64,
        64,
        True,
    )
    assert entry.mean == pytest.approx(tiny_entry.mean)

    argv = ["embed", small_images, "--weights", f"local-dir:{out}", "--out", str(tmp_path / "e")]
    assert main([*argv, "--num-workers", "0", "--no-normalize"]) == 0
    table = datasets.read_table(str(tmp_path / "e"), "embeddings", ["image_id", "embedding"])
    got = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    ours = load_model(tiny_entry, str(checkpoint))
    images = datasets.read_table(small_images, "images", ["image_id", "image"]).to_pylist()
    by_id = {row["image_id"]: row["image"] for row in images}
    import io

    pictures = [
        Image.open(io.BytesIO(by_id[i])).convert("RGB")
        for i in table.column("image_id").to_pylist()
    ]
    np.testing.assert_allclose(got, _embed(ours.module, ours.transform, pictures), atol=1e-5)


def test_entry_for_weights_errors_name_the_folder(tmp_path):
    assert entry_for_weights(str(tmp_path)) is None  # not a published-model source
    with pytest.raises(ModelError, match=r"no open_clip_config\.json in this folder"):
        entry_for_weights(f"local-dir:{tmp_path}")
    (tmp_path / "open_clip_config.json").write_text('{"preprocess_cfg": {}}')
    with pytest.raises(ModelError, match="has no 'model_cfg' object"):
        entry_for_weights(f"local-dir:{tmp_path}")


def test_hf_hub_weights_build_their_entry_and_load_from_the_repo_files(
    checkpoint, tiny_entry, tmp_path, monkeypatch
):
    out = tmp_path / "published"
    publish_checkpoint(str(checkpoint), str(out), PublishSettings())
    asked = []

    def download(repo_id, filename, **kwargs):  # the Hub's files, served from the folder
        asked.append((repo_id, filename))
        if repo_id != "org/tiny" or not (out / filename).is_file():
            raise FileNotFoundError(f"{repo_id}/{filename}")
        return str(out / filename)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", download)
    monkeypatch.setattr("open_clip.pretrained.hf_hub_download", download)
    entry = entry_for_weights("hf-hub:org/tiny")
    assert (entry.name, entry.pretrained, entry.embed_dim) == ("tiny", "hf-hub:org/tiny", 64)
    model = load_model(entry)
    ours = load_model(tiny_entry, str(checkpoint))
    images = _images(2)
    np.testing.assert_allclose(
        _embed(model.module, model.transform, images),
        _embed(ours.module, ours.transform, images),
        atol=1e-5,
    )
    assert ("org/tiny", "open_clip_model.safetensors") in asked


def test_hf_hub_weights_offline_say_how_to_use_a_local_copy():
    with pytest.raises(ModelError, match="offline, download the repo and pass local-dir:DIR"):
        entry_for_weights("hf-hub:org/absent")


def test_publish_to_s3_and_load_back_with_local_dir_s3(
    small_checkpoint, bucket, tmp_path, monkeypatch
):
    from embedpipe.core import storage

    monkeypatch.setattr("embedpipe.models.loading.CACHE_DIR", tmp_path / "cache")
    out = f"s3://{bucket}/models/micro"
    publish_checkpoint(str(small_checkpoint), out, PublishSettings())
    names = sorted(e.uri.rsplit("/", 1)[-1] for e in storage.list_files(out))
    assert names == ["README.md", "open_clip_config.json", "open_clip_model.safetensors"]
    entry = entry_for_weights(f"local-dir:{out}")
    assert (entry.name, entry.embed_dim, entry.image_size) == ("micro", 8, 32)
    model = load_model(entry)
    from embedpipe.models.registry import ModelEntry

    saved = json.loads((small_checkpoint / "config.json").read_text())["entry"]
    ours = load_model(ModelEntry(**saved), str(small_checkpoint))
    images = _images(2)
    np.testing.assert_allclose(
        _embed(model.module, model.transform, images),
        _embed(ours.module, ours.transform, images),
        atol=1e-6,
    )


# --- the destination: one model per folder ----------------------------------------------


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_a_fine_tune_then_a_head_into_one_folder_do_not_mix(
    checkpoint, head_checkpoint, tmp_path, capsys
):
    out = tmp_path / "published"
    publish_checkpoint(str(checkpoint), str(out), PublishSettings())
    before = _snapshot(out)
    assert main(["publish", str(head_checkpoint), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert f"--out {out}: holds the published model of another checkpoint" in err
    assert "\n" not in err
    assert _snapshot(out) == before and sorted(p.name for p in out.iterdir()) == sorted(before)
    entry = entry_for_weights(f"local-dir:{out}")  # still the fine-tune, whole
    assert entry.embed_dim == 64 and entry.text


def test_a_folder_of_the_users_files_is_refused_untouched(checkpoint, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "README.md").write_text("my notes")
    (out / "config.json").write_text('{"mine": true}')
    assert main(["publish", str(checkpoint), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert f"--out {out}: not empty (README.md, config.json) and not a published model" in err
    assert _snapshot(out) == {"README.md": b"my notes", "config.json": b'{"mine": true}'}
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json"]


def test_republishing_the_same_checkpoint_replaces_its_own_publish_only(
    checkpoint, tmp_path, capsys
):
    from embedpipe.models.identity import PUBLISH_RECORD, checkpoint_identity

    out = tmp_path / "published"
    publish_checkpoint(str(checkpoint), str(out), PublishSettings())
    config = json.loads((out / "open_clip_config.json").read_text())
    assert config[PUBLISH_RECORD] == {
        "checkpoint": checkpoint_identity(str(checkpoint)),
        "files": ["README.md", "open_clip_config.json", "open_clip_model.safetensors"],
    }
    publish_checkpoint(str(checkpoint), str(out), PublishSettings(name="renamed"))
    assert "# renamed" in (out / "README.md").read_text()
    (out / "notes.txt").write_text("someone else's")
    assert main(["publish", str(checkpoint), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert "a previous publish of this checkpoint, plus files it did not write (notes.txt)" in err


# --- the card's metrics: the published model's, by identity -----------------------------


def _evaluation(path, runs):
    path.write_text(json.dumps({"models": runs, "metadata": "m"}))
    return str(path)


def test_the_card_takes_the_published_models_metrics_by_identity_not_position(
    checkpoint, tmp_path, capsys
):
    from embedpipe.models.identity import checkpoint_identity

    mine = checkpoint_identity(str(checkpoint))
    runs = [
        {"model": "tiny (ckpt)", "identity": mine, "metrics": {"image_image_recall@1": 0.79}},
        {"model": "other", "identity": "sha256:0f", "metrics": {"image_image_recall@1": 0.98}},
    ]
    metrics = _evaluation(tmp_path / "metrics.json", runs)
    publish_checkpoint(str(checkpoint), str(tmp_path / "p"), PublishSettings(), metrics)
    card = (tmp_path / "p" / "README.md").read_text()
    assert "| image_image_recall@1 | 0.7900 |" in card and "0.98" not in card

    others = _evaluation(tmp_path / "others.json", [*runs[1:], {**runs[1], "model": "b2"}])
    argv = ["publish", str(checkpoint), "--out", str(tmp_path / "q"), "--metrics", others]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert "none of its models (other, b2) is the checkpoint being published" in err
    assert not (tmp_path / "q").exists()


def test_an_open_clip_cards_snippet_and_printed_line_embed_a_picture(
    checkpoint, tiny_entry, tmp_path, capsys
):
    import re

    import skimage.data

    from embedpipe.publish.usage import load_line

    out = tmp_path / "published"
    publish_checkpoint(str(checkpoint), str(out), PublishSettings())
    picture = tmp_path / "coffee.jpg"
    Image.fromarray(skimage.data.coffee()).save(picture)
    ours = load_model(tiny_entry, str(checkpoint))
    expected = _embed(ours.module, ours.transform, [Image.open(picture)])
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)

    (code,) = re.findall(r"```python\n(.*?)```", (out / "README.md").read_text(), re.DOTALL)
    code = code.replace("local-dir:PATH", f"local-dir:{out}")
    namespace: dict = {}
    exec(code.replace('"IMAGE.jpg"', json.dumps(str(picture))), namespace)
    np.testing.assert_allclose(namespace["embedding"].numpy(), expected, atol=1e-5)
    assert namespace["text"].shape == (1, 64)

    exec(load_line(str(out), str(picture)), {})
    assert capsys.readouterr().out.startswith("tensor([[")


def test_a_head_published_to_s3_loads_back_and_the_prefix_refuses_another_model(
    head_checkpoint, small_checkpoint, bucket, tmp_path, monkeypatch
):
    from embedpipe.core import storage

    monkeypatch.setattr("embedpipe.models.loading.CACHE_DIR", tmp_path / "cache")
    out = f"s3://{bucket}/models/head"
    publish_checkpoint(str(head_checkpoint), out, PublishSettings())
    names = sorted(e.uri.rsplit("/", 1)[-1] for e in storage.list_files(out))
    assert names == [
        "README.md",
        "config.json",
        "model.safetensors",
        "modeling_embedpipe_head.py",
        "preprocessor_config.json",
    ]
    publish_checkpoint(str(head_checkpoint), out, PublishSettings(name="again"))  # its own
    with pytest.raises(ValueError, match="holds the published model of another checkpoint"):
        publish_checkpoint(str(small_checkpoint), out, PublishSettings())
    assert sorted(e.uri.rsplit("/", 1)[-1] for e in storage.list_files(out)) == names

    entry = entry_for_weights(f"local-dir:{out}")
    model = load_model(entry, f"local-dir:{out}")
    ours = load_model(entry_for_weights(f"local-dir:{out}"), str(head_checkpoint))
    images = _images(2)
    pixels = torch.stack([ours.transform(i) for i in images])
    with torch.no_grad():
        np.testing.assert_allclose(
            model.encode_images(pixels).numpy(), ours.encode_images(pixels).numpy(), atol=1e-6
        )
    with pytest.raises(ModelError, match="no published model here"):
        entry_for_weights(f"local-dir:s3://{bucket}/models/absent")


def test_a_nested_fine_tune_publishes_its_prefixes_in_open_clips_config(tiny_entry, tmp_path):
    """A fine-tune trained with nested_dims keeps open_clip's layout (which open_clip still
    loads) and its prefixes, so evaluate reports recall@K per prefix for local-dir:."""
    from embedpipe.evaluate.nested import trained_nested_dims

    torch.manual_seed(0)
    path = tmp_path / "ckpt"
    save_model(load_model(tiny_entry, "random"), str(path))
    config = json.loads((path / "config.json").read_text())
    config["train"] = {"epochs": 1, "nested_dims": [16, 32]}
    (path / "config.json").write_text(json.dumps(config))
    out = tmp_path / "published"
    publish_checkpoint(str(path), str(out), PublishSettings())
    assert trained_nested_dims(str(path)) == (16, 32)
    assert trained_nested_dims(f"local-dir:{out}") == (16, 32)
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    assert model.visual.output_dim == tiny_entry.embed_dim


def test_a_checkpoint_with_non_finite_weights_is_refused_naming_the_weight(
    head_checkpoint, tmp_path, capsys
):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "diverged"
    shutil.copytree(head_checkpoint, broken)
    weights = load_file(broken / "model.safetensors")
    name = sorted(weights)[-1]
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, broken / "model.safetensors")
    assert main(["publish", str(broken), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert f"model.safetensors: weight {name} holds NaN or infinity" in err.splitlines()[-1]
    assert "Traceback" not in err and not (tmp_path / "out").exists()
