"""The loss-against-wall-time overlay (neuroray/training/plots.py): no Ray, no lab."""

import json

import pytest

from neuroray.training.plots import loss_vs_wall_time, wall_time_series


def _metrics(path, losses, seconds_per_step, eval_loss=None):
    rows = [{"step": i + 1, "round": 1, "loss": loss, "elapsed_s": (i + 1) * seconds_per_step}
            for i, loss in enumerate(losses)]
    if eval_loss is not None:
        rows.append({"step": len(losses), "eval_loss": eval_loss, "eval_perplexity": 2.0})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_the_series_is_a_running_mean_against_the_loop_time(tmp_path):
    f = _metrics(tmp_path / "m.jsonl", [6.0, 4.0, 2.0, 0.0], 0.5, eval_loss=1.5)
    times, mean, final = wall_time_series(f, smooth=2)
    assert times == [0.5, 1.0, 1.5, 2.0]
    assert mean == pytest.approx([6.0, 5.0, 3.0, 1.0])  # a window shorter than the run at its start
    assert final == 1.5
    assert wall_time_series(f, smooth=1)[1] == [6.0, 4.0, 2.0, 0.0]


def test_the_overlay_draws_every_run_that_has_training_rows(tmp_path):
    import matplotlib.image

    runs = {"unshaped": _metrics(tmp_path / "a.jsonl", [5.0, 4.0, 3.5], 1.0, eval_loss=3.4),
            "100mbit": _metrics(tmp_path / "b.jsonl", [5.0, 4.2, 3.6], 3.0),
            "missing": tmp_path / "none.jsonl"}  # never written: left out, not an error
    out = loss_vs_wall_time(runs, tmp_path / "overlay.png", title="t", smooth=2)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(out).shape[:2] == (440, 770)  # 7 x 4 inches at 110 dpi
    assert wall_time_series(runs["missing"]) == ([], [], None)
