"""Report figures: what a reader sees on the axes."""

from embedpipe.evaluate import plots


def test_the_recall_axis_is_labelled_with_the_measured_ks(monkeypatch):
    drawn = []
    monkeypatch.setattr(plots, "_png", lambda plt, figure: drawn.append(figure) or "")
    plots.recall_plot({"image_image": {"untrained": {1: 0.5, 5: 0.8}, "trained": {1: 0.7, 5: 0.9}}})
    (axes,) = drawn[0].axes
    drawn[0].canvas.draw()
    assert [label.get_text() for label in axes.get_xticklabels()] == ["1", "5"]
    assert axes.get_xticklabels(minor=True) == []
