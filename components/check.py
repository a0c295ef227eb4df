def check_settings(
    settings: dict,
    ingest: dict = {},  # noqa: B006 (KFP reads the defaults from the signature)
    catalog: dict = {},  # noqa: B006
    split: dict = {},  # noqa: B006
    taxonomy: dict = {},  # noqa: B006
    dedup: dict = {},  # noqa: B006
    embed: dict = {},  # noqa: B006
    mine: dict = {},  # noqa: B006
    combine: dict = {},  # noqa: B006
    to_hf: dict = {},  # noqa: B006
    train: dict = {},  # noqa: B006
    tune: dict = {},  # noqa: B006
    evaluate: dict = {},  # noqa: B006
    publish: dict = {},  # noqa: B006
):
    """A pipeline's first step: every stage's compiled settings merged with the run's
    overrides and validated, so a typo fails in seconds, before any data is read.

    ``settings`` maps each stage of the pipeline to its compiled section; every other
    argument is one stage's overrides (a pipeline run parameter).
    """
    overrides = {name: value for name, value in locals().items() if name != "settings"}
    from embedpipe.config import check_overrides

    check_overrides(settings, overrides)
