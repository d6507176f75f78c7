"""The HTML report: one offline file with the circuit, clickable cards, quality and search; its JSON
exports; and the page opened in real headless Chromium (click a node, see its card, no console errors)."""

import base64
import html
import json
import re
from pathlib import Path

import pytest

from featcircuit.errors import UserError
from featcircuit.evaluation import evaluate_pair
from featcircuit.evidence import edge_evidence, graph_edges
from featcircuit.features import collect_stats, labels_for
from featcircuit.graph import CircuitGraph
from featcircuit.labels import label_pair
from featcircuit.replacement import Replacement
from featcircuit.report import write_report
from helpers import CHROMIUM, browser, click_node, random_pair, screenshot_report, text_tokens

LAYER = 1


def _search_result(n: int) -> dict:
    sizes = [0, 1, 2, n]
    def pts(f):
        return [{"size": s, "kl": 0.1 * (1 - f(s)), "faithfulness": f(s), "kl_complement": 0.1 * f(s),
                 "completeness": 1 - f(s)} for s in sizes]

    curves = {"sizes": sizes, "kl_full": 0.0, "kl_empty": 0.1,
              "curves": {"attribution": pts(lambda s: s / n), "search": pts(lambda s: min(1, 2 * s / n)),
                         "random": pts(lambda s: s / (2 * n))},
              "circuit": {"size": 2, "kl": 0.02, "faithfulness": 0.8}}
    return {"search": {"tau": 1e-4, "ablation": "zero", "passes": 3, "naive_passes": 6, "seconds": 0.1,
                       "d_full": 0.0, "d_empty": 0.1, "n_candidates": n, "n_kept": 2, "visited": []},
            "validation": {"metric_full": 1.0, "edges": [], "pearson": 0.9, "spearman": 0.8, "disagree": [],
                           "n_disagree": 0},
            "faithfulness": curves}


@pytest.fixture(scope="module")
def report(neox, tmp_path_factory):
    """A report of a small graph over features that do fire, with quality, search, a PNG, scored
    labels (fitted on other rows than the report's) and edge evidence."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = tmp_path_factory.mktemp("report")
    all_tokens = text_tokens(neox)
    tokens = all_tokens[:8]
    pair = random_pair(neox, LAYER)
    stats = collect_stats(Replacement(neox, {LAYER: pair}), tokens, progress=False)
    r = stats["resid"].freq.argsort(descending=True)[:3].tolist()
    m = stats["mlp"].freq.argsort(descending=True)[:3].tolist()
    src = [r[0], r[0], r[1], r[2], -1]
    dst = [m[0], m[1], m[1], m[2], m[0]]
    w = [0.5, -0.3, 0.2, 0.1, 0.05]
    nodes = sorted({("resid", i) for i in src if i >= 0} | {("mlp", j) for j in dst})
    want = {site: [f for s, f in nodes if s == site] for site in ("resid", "mlp")}
    scored = label_pair(Replacement(neox, {LAYER: pair}), all_tokens[8:], tokens, features=want,
                        cache_dir=out / "cache")
    labels = labels_for(nodes, stats, tokens, neox.tokenizer, LAYER, scored=scored)
    node_stats = {f"{s}{LAYER}/{f}": {**stats[s].node_stats(f), "effect": 0.01 * (k + 1),
                                      "label_f1": scored[s][f]["f1"]}
                  for k, (s, f) in enumerate(nodes)}
    graph = CircuitGraph.from_edges(LAYER, src, dst, w, [abs(x) for x in w], [3] * len(w),
                                    delta=[0.01, None, 0.002, None, None], node_stats=node_stats,
                                    labels=labels, meta={"model": "tiny-neox", "layer": LAYER,
                                                         "tokens": int(tokens.numel())})
    quality = evaluate_pair(Replacement(neox, {LAYER: pair}), tokens[:2], progress=False)
    search = _search_result(len(w))
    fig = plt.figure(figsize=(3, 2))
    plt.plot([0, 1], [0, 1])
    fig.savefig(out / "faithfulness.png")
    plt.close(fig)
    evidence = edge_evidence(Replacement(neox, {LAYER: pair}), tokens, graph_edges(graph), k=3)
    path = write_report(out, rep=Replacement(neox, {LAYER: pair}), tokens=tokens, graph=graph,
                        quality=quality, search=search, stats=stats, cache_dir=out / "cache",
                        labels=scored, evidence=evidence)
    return {"path": path, "graph": graph, "out": out, "r": r, "m": m, "scored": scored, "stats": stats,
            "evidence": evidence}


def test_report_is_one_offline_file(report):
    text = report["path"].read_text()
    assert report["path"].name == "report.html"
    # nothing fetched: no src/href to another file or a URL (SVG xmlns URIs are names, not fetches)
    refs = re.findall(r'(?:src|href)\s*=\s*["\']([^"\']*)', text)
    assert refs and all(u.startswith(("data:", "#")) for u in refs), refs
    assert "<script src" not in text and "<link rel=\"stylesheet\"" not in text
    assert "<svg" in text and "class=\"node\"" in text
    png = base64.b64encode((report["out"] / "faithfulness.png").read_bytes()).decode()
    assert png[:200] in text
    g = report["graph"]
    for n in g.sorted_nodes():
        assert f'data-node="{n}"' in text  # one card per node, error node included
    assert text.count('class="card"') == g.g.number_of_nodes()
    for key in ("Top activations", "one example per activation bin", "Logit lens", "Token removal",
                "Activation density", "Dictionary quality", "recovered_vs_zero", "Faithfulness",
                "Single-edge validation"):
        assert key in text


def test_exports_neuronpedia_and_attribution_graph(report):
    out, g = report["out"], report["graph"]
    feats = json.loads((out / "features.json").read_text())
    n_feat = sum(1 for n in g.sorted_nodes() if g.g.nodes[n]["feature"] >= 0)
    assert len(feats["features"]) == n_feat
    f = feats["features"][0]
    for key in ("pos_str", "pos_values", "neg_str", "neg_values", "frac_nonzero", "maxActApprox",
                "freq_hist_data_bar_heights", "freq_hist_data_bar_values",
                "logits_hist_data_bar_heights", "logits_hist_data_bar_values", "activations", "index"):
        assert key in f, key
    assert len(f["freq_hist_data_bar_heights"]) == len(f["freq_hist_data_bar_values"])
    a = f["activations"][0]
    assert set(a) >= {"tokens", "values", "maxValue", "maxValueTokenIndex", "binMin", "binMax", "binContains"}
    assert len(a["tokens"]) == len(a["values"]) and a["values"][a["maxValueTokenIndex"]] == pytest.approx(
        a["maxValue"]) and a["maxValue"] == pytest.approx(f["maxActApprox"])
    assert any(x["binMin"] is not None for x in f["activations"])  # the per-bin examples are there too
    ag = json.loads((out / "attribution_graph.json").read_text())
    assert set(ag) >= {"metadata", "nodes", "links"}
    assert {n["node_id"] for n in ag["nodes"]} == set(g.g.nodes)
    assert {(x["source"], x["target"], x["weight"]) for x in ag["links"]} == {
        (u, v, d["weight"]) for u, v, d in g.g.edges(data=True)}
    err = [n for n in ag["nodes"] if n["feature"] < 0]
    assert err and err[0]["feature_type"] == "resid reconstruction error"


def test_cards_show_scored_labels_dense_flags_and_edge_evidence(report):
    text, g, out = report["path"].read_text(), report["graph"], report["out"]
    card_re = r'<section class="card" data-node="([^"]+)">.*?</section>'
    sections = {m.group(1): m.group(0) for m in re.finditer(card_re, text, re.S)}
    n_dense = 0
    for n in g.sorted_nodes():
        d = g.g.nodes[n]
        if d["feature"] < 0:
            continue
        sec, lab = sections[n], report["scored"][d["site"]][d["feature"]]
        assert html.escape(lab["text"]) in sec
        if lab["f1"] is not None:
            assert f"held-out <b>F1 {lab['f1']:.2f}</b>" in sec
            assert f"[F1 {lab['f1']:.2f}]" in d["label"]  # the node's own label carries the score
        dense = float(report["stats"][d["site"]].freq[d["feature"]]) > 0.1
        n_dense += dense
        assert ("class='dense'" in sec.split("</h3>")[0]) == dense, n
        assert "Across the quantiles" in sec
    assert n_dense  # the fixture's most frequent features include dense ones
    assert "DENSE" in g.to_dot()
    # every edge's evidence is in the cards of both its ends, and in the JSON exports
    for x in report["evidence"]:
        tag = f"data-edge='{x['source']}->{x['target']}'"
        assert tag in sections[x["target"]]
        if x["source"] in sections:
            assert tag in sections[x["source"]]
        assert "mean per co-activation" in sections[x["target"]]
    ev = json.loads((out / "edge_evidence.json").read_text())
    assert [(e["source"], e["target"]) for e in ev["edges"]] == [(u, v) for u, v, _ in g.sorted_edges()]
    ag = json.loads((out / "attribution_graph.json").read_text())
    for link in ag["links"]:
        assert link["mean_per_coactivation"] == pytest.approx(link["weight"] / link["count"])
        assert "evidence" in link and "top_tokens" in link
    feats = {f["featcircuit"]["id"]: f for f in json.loads((out / "features.json").read_text())["features"]}
    for nid, f in feats.items():
        site, feat = ("resid" if nid.startswith("resid") else "mlp"), int(nid.split("/")[1])
        assert f["explanations"][0]["score"] == report["scored"][site][feat]["f1"]
        assert f["featcircuit"]["label_score"]["f1"] == report["scored"][site][feat]["f1"]
        assert f["featcircuit"]["dense"] == (f["frac_nonzero"] > 0.1)


def test_report_without_dot_says_so(report, neox, monkeypatch, tmp_path):
    import featcircuit.report as R

    monkeypatch.setattr(R.shutil, "which", lambda name: None)
    pair = random_pair(neox, LAYER)
    path = write_report(tmp_path, rep=Replacement(neox, {LAYER: pair}), tokens=text_tokens(neox)[:4],
                        graph=report["graph"], quality=None, removal=False, cache_dir=tmp_path / "c")
    text = path.read_text()
    assert "<svg" not in text.split('id="panel"')[0].split('id="graph"')[1]
    assert "graphviz <code>dot</code> was not found" in text
    assert "no search was run" in text and "no quality results" in text


def _severe(log):
    return [x for x in log if x.get("level") == "SEVERE"]


@pytest.mark.skipif(not Path(CHROMIUM).exists(),
                    reason=f"{CHROMIUM} is absent: install Debian's chromium and chromium-driver "
                           "(scripts/test.sh does, as root with apt-get)")
def test_report_in_headless_chromium(report, tmp_path):
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.fail("selenium is not installed: it is in the test extras (pip install -e '.[test]')")
    from selenium.webdriver.common.by import By

    g = report["graph"]
    node = f"mlp{LAYER}/{report['m'][1]}"
    other = f"resid{LAYER}/{report['r'][0]}"
    with browser(1400, 900) as driver:
        driver.get(report["path"].resolve().as_uri())
        assert driver.title.startswith("featcircuit")
        shot = tmp_path / "report.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        assert driver.find_elements(By.CSS_SELECTOR, ".card.open") == []
        assert len(driver.find_elements(By.CSS_SELECTOR, "#graph g.node")) == g.g.number_of_nodes()
        # click the node in the SVG: its card (and only it) shows
        click_node(driver, node)
        open_ = driver.find_elements(By.CSS_SELECTOR, ".card.open")
        assert len(open_) == 1 and open_[0].get_attribute("data-node") == node
        assert open_[0].is_displayed()
        body = open_[0].text
        assert "Top activations" in body and "Logit lens" in body and "Activation density" in body
        assert "Token removal" in body and "one example per activation bin" in body
        sel = driver.find_elements(By.CSS_SELECTOR, "#graph g.node.sel title")
        assert [t.get_attribute("textContent") for t in sel] == [node]
        driver.save_screenshot(str(tmp_path / "card.png"))
        # a row of the card's edge table opens the node at the other end
        driver.find_element(By.CSS_SELECTOR, f'.card.open tr[data-open="{other}"]').click()
        open_ = driver.find_elements(By.CSS_SELECTOR, ".card.open")
        assert [c.get_attribute("data-node") for c in open_] == [other]
        # the close button hides it again
        open_[0].find_element(By.CSS_SELECTOR, ".close").click()
        assert driver.find_elements(By.CSS_SELECTOR, ".card.open") == []
        # a URL hash opens a card on load
        driver.get(report["path"].resolve().as_uri() + "#" + node.replace("/", "%2F"))
        open_ = driver.find_elements(By.CSS_SELECTOR, ".card.open")
        assert [c.get_attribute("data-node") for c in open_] == [node]
        log = driver.get_log("browser")
        assert _severe(log) == [], log
        # the log check is not vacuous: an error in the page shows up as SEVERE
        driver.execute_script("console.error('featcircuit-test-error')")
        assert any("featcircuit-test-error" in x["message"] for x in _severe(driver.get_log("browser")))


def test_screenshot_helper(report, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is absent")
    node = f"mlp{LAYER}/{report['m'][0]}"
    log = screenshot_report(report["path"], tmp_path / "shot.png", node=node, width=1200, height=800)
    assert _severe(log) == [], log
    assert (tmp_path / "shot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_from_given_cards_needs_no_model(report, tmp_path):
    """With the cards already made, the page and exports need no model: its name and the layer
    come from the graph's meta."""
    path = write_report(tmp_path, rep=None, tokens=None, graph=report["graph"], quality=None, cards={})
    feats = json.loads((tmp_path / "features.json").read_text())
    assert path.is_file() and feats["modelId"] == "tiny-neox" and feats["layer"] == LAYER
    with pytest.raises(UserError, match="needs the cards"):
        write_report(tmp_path, rep=None, tokens=None, graph=report["graph"], quality=None)
