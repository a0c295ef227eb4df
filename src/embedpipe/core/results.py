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
