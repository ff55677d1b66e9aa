"""``conmim report`` on synthetic results: the paired table against numbers computed by hand, the
wording of rows without a test or without a detected Δ, the forest plot, the sweep file's
``report`` section, the probe encoder and the positional-shortcut flag."""
import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from conmim.cli import main
from conmim.report import make_report
from conmim.report.plot import forest_figure
from conmim.report.table import probe_encoder, summarize
from conmim.metrics import FINAL_METRICS, TIMINGS

NAN = float("nan")
# closed forms of Student t (see tests/test_stats.py): 2 dof P(|T| > t) = 1 - t/sqrt(2 + t²),
# t_.975 = 4.302653; 1 dof P(|T| > t) = 1 - 2 atan(t)/π, t_.975 = 12.706205
P_PLUS = 1 - math.sqrt(7) / 3                     # Δ = 1, 2, 4: t = sqrt(7)          -> 0.118083
P_MINUS = 1 - 6 * math.sqrt(3) / math.sqrt(110)   # Δ = -3, -3.5, -2.5: t = -6 sqrt(3)  -> 0.009133
P_PARTIAL = 1 - 2 * math.atan(2) / math.pi        # Δ = 0.5, 1.5: t = 2, 1 dof        -> 0.295167
MDE_3_PAIRS = 3.264044                            # MDE at n = 3 per unit sd (tests/test_stats.py)


def row(variant, seed, top1, status="finished", overrides=None, alias_of="", **kw):
    """A results.parquet row as ``conmim.run.results.collect_rows`` writes it."""
    r = {"trial": f"{variant}_seed{seed}", "variant": variant, "seed": seed, "note": "",
         "overrides": json.dumps(overrides or {}, sort_keys=True), "alias_of": alias_of, "canonical_hash": "h",
         "status": status, "reason": "", "node_id": "", **{k: NAN for k in FINAL_METRICS + TIMINGS},
         "collapsed": False, "at_chance": False}
    r.update(finetune_top1=top1, finetune_val_top1=top1, linear_probe_top1=0.5, knn_top1=0.6, final_target_std=0.9)
    r.update(kw)
    return r


def write(d, rows, report=None):
    d.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), d / "results.parquet")
    if report is not None:
        f = d.parent / f"{d.name}.yaml"
        f.write_text(yaml.safe_dump({"name": d.name, "base": "tiny", "report": report}))
        (d / "sweep.json").write_text(json.dumps({"name": d.name, "sweep_file": str(f)}))
    return d


def three_seeds():
    base = {0: 0.700, 1: 0.720, 2: 0.710}
    rows = [row("baseline", s, v) for s, v in base.items()]
    rows += [row("plus", s, base[s] + d / 100, overrides={"objective.temperature": 0.2}) for s, d in zip(base, (1, 2, 4))]
    rows += [row("minus", s, base[s] + d / 100, overrides={"objective.target_encoder": "shared"})
             for s, d in zip(base, (-3, -3.5, -2.5))]
    rows += [row("partial", 0, 0.705), row("partial", 1, 0.735), row("partial", 2, NAN, status="failed")]
    return rows


def line(md, variant):
    return next(l for l in md.splitlines() if l.startswith(f"| {variant} |"))


def test_paired_table_by_hand(tmp_path):
    res = make_report(write(tmp_path / "sw", three_seeds()))
    s = {x["variant"]: x for x in res["summary"]}
    # Δ, 95 % CI (mean ± t_.975 · sd/√n), paired-t p: by hand, see tests/test_stats.py
    assert s["plus"]["delta"] == pytest.approx(7 / 3) and s["plus"]["n_pairs"] == 3
    assert s["plus"]["delta_ci"] == (pytest.approx(-1.461250, abs=1e-5), pytest.approx(6.127916, abs=1e-5))
    assert s["minus"]["delta_ci"] == (pytest.approx(-4.242069, abs=1e-5), pytest.approx(-1.757931, abs=1e-5))
    assert s["partial"]["n_pairs"] == 2 and s["partial"]["delta"] == pytest.approx(1.0)
    assert s["partial"]["delta_ci"] == (pytest.approx(-5.353102, abs=1e-5), pytest.approx(7.353102, abs=1e-5))
    assert [s[v]["p"] for v in ("plus", "minus", "partial")] == pytest.approx([P_PLUS, P_MINUS, P_PARTIAL], abs=1e-8)
    # Holm over m = 3: minus 3·0.009133, plus 2·0.118083, partial max(0.236166, 0.295167)
    assert s["minus"]["p_holm"] == pytest.approx(0.027398, abs=1e-6) == 3 * P_MINUS
    assert s["plus"]["p_holm"] == pytest.approx(0.236166, abs=1e-6) == 2 * P_PLUS
    assert s["partial"]["p_holm"] == pytest.approx(0.295167, abs=1e-6)
    assert [s[v]["significant"] for v in ("baseline", "plus", "minus", "partial")] == [False, False, True, False]
    assert math.isnan(s["baseline"]["p"]) and s["baseline"]["is_reference"]
    # the MDE at 80 % power scales with the observed sd of Δ: sqrt(7/3) · 3.264044 = 4.9859
    assert s["plus"]["mde"] == pytest.approx(math.sqrt(7 / 3) * MDE_3_PAIRS, abs=1e-4)

    md = res["markdown"]
    minus = line(md, "minus")
    assert "-3.00 [-4.24, -1.76]*" in minus and "| 0.009 | 0.027 |" in minus and "Δ < 0 (Holm p < 0.05)" in minus
    plus = line(md, "plus")
    assert "+2.33 [-1.46, +6.13] |" in plus and "| 0.118 | 0.236 | 4.99 | 3 |" in plus
    assert "smaller than 4.99 points" in plus  # a CI including 0 reads "smaller than the MDE"
    assert "| 2 |" in line(md, "partial") and "1 failed" in line(md, "partial")
    assert "reference" in line(md, "baseline") and "71.00 ± 1.00" in line(md, "baseline")
    assert "no effect" not in md.lower() and "no difference" not in md.lower()
    assert (tmp_path / "sw" / "report.md").read_text() == md


def test_one_seed_gives_delta_without_ci_and_says_so(tmp_path):
    d = write(tmp_path / "one", [row("baseline", 0, 0.70), row("t02", 0, 0.71)])
    res = make_report(d)
    t02 = line(res["markdown"], "t02")
    assert "| +1.00 | – | – | – | 1 | n = 1 pair: no CI, no p-value |" in t02 and "[" not in t02
    fig = forest_figure(res["summary"], "one")
    ax = fig.axes[0]
    texts = [t.get_text() for t in ax.texts]
    assert "n = 1: no CI" in texts and "n = 1" in ax.get_title()
    assert not ax.containers  # no error bar (no zero-width whiskers) and no MDE band
    png = res["png"]
    assert png.name == "report.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_forest_plot_draws_the_ci_the_zero_line_and_the_mde(tmp_path):
    res = make_report(write(tmp_path / "sw", three_seeds()))
    s = [x for x in res["summary"] if not x["is_reference"]]
    ax = forest_figure(res["summary"], "sw").axes[0]
    from matplotlib.container import BarContainer, ErrorbarContainer
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 3
    for c, x in zip(bars, s):  # one horizontal whisker per row, from the CI's low to its high end
        (a, b), = [seg[:, 0] for seg in c.lines[2][0].get_segments()]
        assert (a, b) == (pytest.approx(x["delta_ci"][0]), pytest.approx(x["delta_ci"][1]))
    mde = [c.patches[0] for c in ax.containers if isinstance(c, BarContainer)]
    assert [p.get_width() for p in mde] == pytest.approx([2 * x["mde"] for x in s])
    assert [p.get_x() for p in mde] == pytest.approx([-x["mde"] for x in s])
    assert any(list(l.get_xdata()) == [0, 0] for l in ax.lines)  # the zero line
    assert [t.get_text() for t in ax.texts].count("*") == 1  # the one Holm-significant row
    assert "points" in ax.get_xlabel() and "finetune_top1" in ax.get_xlabel()
    assert [t.get_text().split(" (")[0] for t in ax.get_yticklabels()][::-1] == ["plus", "minus", "partial"]
    assert res["png"].stat().st_size > 10000


def test_primary_metric_and_reference_come_from_the_sweep_file(tmp_path):
    rows = three_seeds()
    for r in rows:  # k-NN is the primary now: its Δ differs from the fine-tune's
        r["knn_top1"] = 0.6 + (0.02 if r["variant"] == "minus" else 0) + 0.001 * r["seed"]
    d = write(tmp_path / "sw", rows, report={"metric": "knn_top1", "baseline": "minus"})
    md = make_report(d)["markdown"]
    header = next(l for l in md.splitlines() if l.startswith("| variant |"))
    assert "| knn_top1 | Δ [95 % CI] |" in header and "full-label FT" in header
    assert "Δ vs `minus`" in md and "reference" in line(md, "minus")
    base = line(md, "baseline")
    assert "-2.00 |" in base or "-2.00 [" in base  # knn 2 points below the reference on every seed
    assert "70.00 |" not in base and "71.00 | 50.00 |" in base  # full-label FT mean 71.00 shown beside the probe


def test_metric_option_writes_a_secondary_table_beside_the_primary(tmp_path):
    rows = three_seeds()
    for r in rows:
        r["knn_top1"] = 0.6 + (0.05 if r["variant"] == "minus" else 0) + 0.001 * r["seed"]
    d = write(tmp_path / "sw", rows)
    primary = make_report(d)["markdown"]
    res = CliRunner().invoke(main, ["report", str(d), "--metric", "knn_top1"])
    assert res.exit_code == 0, res.output
    knn = (d / "report_knn_top1.md").read_text()
    assert "| knn_top1 | Δ [95 % CI] |" in knn and "+5.00" in line(knn, "minus")
    assert (d / "report.md").read_text() == primary and (d / "report_knn_top1.png").exists()
    bad = CliRunner().invoke(main, ["report", str(d), "--metric", "top5"])
    assert bad.exit_code == 2 and "report.metric" in bad.output and "knn_top1" in bad.output, bad.output


def test_unknown_metric_in_the_sweep_file_is_exit_2(tmp_path):
    d = write(tmp_path / "sw", three_seeds(), report={"metric": "top5"})
    res = CliRunner().invoke(main, ["report", str(d)])
    assert res.exit_code == 2 and "report.metric" in res.output and "'top5'" in res.output, res.output
    assert "finetune_top1" in res.output and "knn_top1" in res.output and "Traceback" not in res.output


def test_probe_encoder_column_and_derivation():
    assert probe_encoder({"probe_encoder": "online"}) == "online"
    assert probe_encoder({"overrides": json.dumps({"objective.target_encoder": "shared"})}) == "online"
    assert probe_encoder({"overrides": json.dumps({"finetune.encoder": "online"})}) == "online"
    assert probe_encoder({"overrides": json.dumps({"pretrain.enabled": False})}) == "random init"
    assert probe_encoder({"overrides": "{}"}) == "momentum"
    assert probe_encoder({"config": {"objective": {"target_encoder": "shared"}, "finetune": {"encoder": "momentum"}}}) == "online"
    rows = three_seeds()
    for r in rows:
        if r["variant"] == "plus":
            r["probe_encoder"] = "momentum, online"
    s = {x["variant"]: x for x in summarize(rows)}
    assert (s["baseline"]["probe_encoder"], s["minus"]["probe_encoder"], s["plus"]["probe_encoder"]) == \
        ("momentum", "online", "momentum, online")


def test_positional_shortcut_is_flagged(tmp_path):
    rows = three_seeds()
    for r in rows:
        r["positional_shortcut"] = r["variant"] == "minus" and r["seed"] != 2
    md = make_report(write(tmp_path / "sw", rows))["markdown"]
    assert "POSITIONAL SHORTCUT" in line(md, "minus") and "2 positional shortcut" in line(md, "minus")
    assert "2 of 11 finished trials solved the pre-training task by position** (minus)" in md
    assert "shortcut" not in line(md, "baseline").lower() and "SHORTCUT" not in line(md, "plus")
    clean = make_report(write(tmp_path / "clean", three_seeds()))["markdown"]
    assert "by position" not in clean and "SHORTCUT" not in clean


def test_report_from_mlflow_reads_the_primary_metric_from_the_parent_run(tmp_path):
    from mlflow.tracking import MlflowClient
    from conmim.tracking.tags import REPORT_METRIC as REPORT_METRIC_TAG
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(uri)
    exp = c.create_experiment("swp")
    parent = c.create_run(exp, tags={"conmim.role": "sweep", REPORT_METRIC_TAG: "knn_top1"}).info.run_id
    for variant, knn in (("baseline", (0.60, 0.62, 0.61)), ("t02", (0.61, 0.64, 0.65))):
        for seed, v in enumerate(knn):
            rid = c.create_run(exp, tags={"conmim.role": "trial", "conmim.trial": f"{variant}_seed{seed}",
                                          "conmim.variant": variant, "conmim.seed": str(seed), "mlflow.parentRunId": parent,
                                          "conmim.overrides": "{}"}).info.run_id
            for k, x in {"finetune_top1": 0.7, "knn_top1": v, "linear_probe_top1": 0.5, "final_target_std": 0.9}.items():
                c.log_metric(rid, k, x)
            c.set_terminated(rid, "FINISHED")
    res = make_report("swp", uri, tmp_path / "out")
    t02 = line(res["markdown"], "t02")
    assert "| knn_top1 |" in next(l for l in res["markdown"].splitlines() if l.startswith("| variant |"))
    assert "+2.33 [-1.46, +6.13] | 0.118 | 0.118 |" in t02  # Δ = 1, 2, 4 points: the hand numbers above
    assert (tmp_path / "out" / "report.png").exists()


def test_diverged_pretraining_is_flagged(tmp_path):
    rows = three_seeds()
    for r in rows:
        r["diverged"] = r["variant"] == "minus"
    md = make_report(write(tmp_path / "sw", rows))["markdown"]
    assert "DIVERGED" in line(md, "minus") and "3 diverged" in line(md, "minus")
    assert "3 of 11 finished trials diverged in pre-training** (minus)" in md
    assert "diverged" not in line(md, "baseline").lower() and "DIVERGED" not in line(md, "plus")
    assert "DIVERGED" not in make_report(write(tmp_path / "clean", three_seeds()))["markdown"]
