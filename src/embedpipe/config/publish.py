"""Settings of `publish`: a checkpoint -> open_clip's Hugging Face layout (or a
transformers custom model for a projection head), a model card, optionally the Hub."""

from __future__ import annotations

from pydantic import Field

from embedpipe.config.base import Section


class PublishSettings(Section):
    push: str = Field("", description="upload to this Hugging Face repo (org/name); empty: no push")
    revision: str = Field("main", description="branch of the repo the upload commits to")
    commit_message: str = Field(
        "Publish with embedpipe", description="commit message of the upload"
    )
    private: bool = Field(False, description="create the repo private")
    token_file: str = Field(
        "", description="file holding the Hub token (a mounted Secret); HF_TOKEN is read first"
    )
    hub_endpoint: str = Field("", description="Hub URL; empty: HF_ENDPOINT or huggingface.co")
    name: str = Field("", description="model name in the card; empty: the repo or the entry name")
    license: str = Field("other", description="license id in the model card (e.g. apache-2.0)")
    tags: tuple[str, ...] = Field((), description="tags of the model card besides embedpipe's own")
    datasets: tuple[str, ...] = Field(
        (), description="Hub dataset ids the model was trained on, for the card"
    )
    intended_use: str = Field("", description="intended use paragraph; empty: a generic one")
    limitations: str = Field("", description="limitations paragraph; empty: a generic one")
    tokenizer_dir: str = Field(
        "", description="tokenizer files to publish for hub-tokenizer models (else fetched)"
    )
    check_count: int = Field(
        4, gt=0, description="images the reload check embeds (generated, or from --check-images)"
    )
    check_tolerance: float = Field(
        1e-4, gt=0, description="largest embedding difference the reload check accepts"
    )
    device: str = Field("cpu", description="device of the reload check: cpu, cuda or cuda:N")
