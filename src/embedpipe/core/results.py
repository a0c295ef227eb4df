"""What every stage returns: a frozen dataclass whose numbers are its metrics."""

from dataclasses import asdict


class StageMetrics:
    """Mixin for result dataclasses: ``metrics()`` is every numeric field, for
    ``Output[Metrics].log_metric`` and the logs (paths, names and lists are left out)."""

    def metrics(self) -> dict[str, float]:
        return {
            name: value
            for name, value in asdict(self).items()
            if isinstance(value, int | float) and not isinstance(value, bool)
        }


def log_metrics(output, result: StageMetrics) -> None:
    """Record a stage result's metrics on a KFP ``Output[Metrics]`` (anything with
    ``log_metric``), so components stay one line here."""
    for name, value in result.metrics().items():
        output.log_metric(name, value)
