"""Uploading a published folder to the Hugging Face Hub: the token comes from the
environment or a mounted Secret file, never from a parameter."""

from __future__ import annotations

import os
import re
from pathlib import Path

from embedpipe.config import PublishSettings

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def hub_token(config: PublishSettings) -> str:
    """The token for ``--push``: HF_TOKEN, else the first line of ``token_file``. Asked
    before anything is done, so a push that cannot happen fails at once."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not REPO_ID.match(config.push):
        raise ValueError(f"--push '{config.push}': expected a Hub repo id ORG/NAME")
    try:
        validate_repo_id(config.push)
    except HFValidationError as error:
        reason = str(error).splitlines()[0].split(": '")[0]
        raise ValueError(f"--push '{config.push}': not a valid Hub repo id ({reason})") from None
    if constants.is_offline_mode():
        raise ValueError(f"--push {config.push}: HF_HUB_OFFLINE is set; unset it to upload")
    token = os.environ.get("HF_TOKEN", "").strip()
    if token:
        return token
    if config.token_file:
        try:
            token = Path(config.token_file).read_text(encoding="utf-8").strip()
        except OSError as error:
            raise ValueError(
                f"[publish].token_file {config.token_file}: cannot read the token: {error.strerror}"
            ) from None
        if not token:
            raise ValueError(f"[publish].token_file {config.token_file}: the file is empty")
        return token
    raise ValueError(
        f"--push {config.push}: no Hub token; set HF_TOKEN or [publish].token_file "
        "(a mounted Secret). Nothing was published"
    )


def push_folder(folder: str, config: PublishSettings, token: str) -> str:
    """Create the repo (if new) and commit every file of ``folder``; the commit's URL."""
    import httpx2  # huggingface_hub's HTTP client: its connection errors
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(endpoint=config.hub_endpoint or None, token=token)
    try:
        api.create_repo(config.push, private=config.private, exist_ok=True)
        if config.revision != "main":
            api.create_branch(config.push, branch=config.revision, exist_ok=True)
        commit = api.upload_folder(
            repo_id=config.push,
            folder_path=folder,
            revision=config.revision,
            commit_message=config.commit_message,
        )
    except (HfHubHTTPError, httpx2.HTTPError) as error:
        first_line = str(error).splitlines()[0]
        raise RuntimeError(
            f"push to {config.push}: {first_line}; nothing was committed: rerun the same "
            "publish to retry (one commit of the whole folder)"
        ) from None
    return commit.commit_url
