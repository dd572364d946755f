"""The training plots: files written, the kept step marked where early stopping put it."""

from __future__ import annotations

from trainers.plots import draw_validation, plot_validation, pyplot

HISTORY = [{"step": s, "loss": 6 - s / 100, "ndcg@10": n, "hr@10": 2 * n, "smoothed_ndcg@10": m}
           for s, n, m in ((100, 0.05, 0.05), (200, 0.09, 0.07), (300, 0.06, 0.0667), (400, 0.08, 0.0767))]


def test_validation_plot_is_written(tmp_path):
    out = plot_validation(HISTORY, 400, tmp_path / "sub" / "v.png", "a run")
    assert out == tmp_path / "sub" / "v.png" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 10_000


def test_validation_curve_follows_the_smoothed_score_and_rings_the_kept_step():
    plt = pyplot()
    fig, ax = plt.subplots()
    draw_validation(ax, HISTORY, 400, "lum")
    points, line, ring = ax.lines
    assert list(points.get_ydata()) == [0.05, 0.09, 0.06, 0.08]
    assert list(line.get_ydata()) == [0.05, 0.07, 0.0667, 0.0767] and line.get_label() == "lum"
    assert list(ring.get_xdata()) == [400] and list(ring.get_ydata()) == [0.0767]
    plt.close(fig)
