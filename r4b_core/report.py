"""The human side of an evaluation: markdown tables and PNG plots from a report.json.

    from r4b_core.report import write_report
    files = write_report(report, Path("out"))       # report.md + accuracy_tokens.png + ...

Plots (matplotlib, Agg backend, no display needed):
  accuracy_tokens.png           accuracy and mean output tokens per mode
  think_rate_by_difficulty.png  auto-mode think-rate per difficulty level, one line per category
  auto_vs_forced.png            per (category, difficulty) cell: auto vs forced accuracy and tokens
  by_level.png                  per category: accuracy per mode and auto think-rate by level
  accuracy_budget.png           with eval.thinking_budgets: accuracy vs thinking budget, one line
                                per mode, the unbudgeted accuracy as a dashed reference
When the report carries a `compare` block (another model's report), every table and plot shows
both models side by side.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MODES = ("auto", "think", "no_think")
PLOTS = ("accuracy_tokens.png", "think_rate_by_difficulty.png", "auto_vs_forced.png", "by_level.png")
BUDGET_PLOT = "accuracy_budget.png"


def _models(report: dict) -> list[tuple[str, dict]]:
    """(label, report-like dict) for the main model and, if present, the compared one."""
    out = [(report.get("tag", "model"), report)]
    if report.get("compare"):
        other = report["compare"]
        label = other.get("tag", "other")
        if label == out[0][0]:
            label += " (compare)"
        out.append((label, other))
    return out


def _f(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _mode_names(report: dict) -> list[str]:
    return [m for m in MODES if m in report.get("modes", {})]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_tokens(report: dict, path: Path) -> Path:
    plt = _plt()
    models = _models(report)
    modes = _mode_names(report)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    width = 0.8 / len(models)
    for j, (label, rep) in enumerate(models):
        xs = [i + (j - (len(models) - 1) / 2) * width for i in range(len(modes))]
        acc = [rep["modes"].get(m, {}).get("accuracy") or 0.0 for m in modes]
        tok = [rep["modes"].get(m, {}).get("mean_tokens") or 0.0 for m in modes]
        bars = axes[0].bar(xs, acc, width, label=label)
        axes[0].bar_label(bars, fmt="%.2f", fontsize=7)
        bars = axes[1].bar(xs, tok, width, label=label)
        axes[1].bar_label(bars, fmt="%.0f", fontsize=7)
    for ax, title in zip(axes, ("accuracy", "mean output tokens")):
        ax.set_xticks(range(len(modes)), modes)
        ax.set_title(title)
        ax.legend(fontsize=7)
    axes[0].set_ylim(0, 1.05)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_think_rate(report: dict, path: Path) -> Path:
    """Auto-mode think-rate by difficulty: overall (thick) and per category (thin)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    styles = ("-", "--")
    for j, (label, rep) in enumerate(_models(report)):
        diffs = sorted(rep.get("by_difficulty", {}), key=lambda d: float(d))
        ys = [(rep["by_difficulty"][d]["modes"].get("auto") or {}).get("think_rate") for d in diffs]
        ax.plot(diffs, [y if y is not None else float("nan") for y in ys], styles[j % 2], marker="o",
                linewidth=2.5, label=f"{label}: all")
        # Per-category curves, from the per-item predictions' cells when the report has them.
        for cat, cells in _cells(rep).items():
            pts = sorted((float(d), c["auto"]["think_rate"]) for d, c in cells.items()
                         if c.get("auto", {}).get("think_rate") is not None)
            if pts:
                ax.plot([str(int(d)) if d.is_integer() else str(d) for d, _ in pts], [y for _, y in pts],
                        styles[j % 2], marker=".", linewidth=1, alpha=0.7, label=f"{label}: {cat}")
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("difficulty")
    ax.set_ylabel("auto-mode think-rate")
    ax.set_title("does auto mode think more on harder items?")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _cells(rep: dict) -> dict[str, dict[str, dict]]:
    """category -> difficulty -> mode -> metrics, from the report's `cells` block."""
    out: dict[str, dict[str, dict]] = {}
    for key, block in (rep.get("cells") or {}).items():
        cat, _, diff = key.rpartition("/")
        out.setdefault(cat, {})[diff] = block["modes"]
    return out


def plot_auto_vs_forced(report: dict, path: Path) -> Path:
    """Each point a (category, difficulty) cell: auto vs think (circles) and vs no-think (squares)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    colors = ("tab:blue", "tab:orange")
    for j, (label, rep) in enumerate(_models(report)):
        cells = _cells(rep) or {c: {"all": b["modes"]} for c, b in rep.get("by_category", {}).items()}
        for forced, marker in (("think", "o"), ("no_think", "s")):
            xa, ya, xt, yt = [], [], [], []
            for cat, by_d in cells.items():
                for d, ms in by_d.items():
                    a, f = ms.get("auto") or {}, ms.get(forced) or {}
                    if a.get("accuracy") is not None and f.get("accuracy") is not None:
                        xa.append(f["accuracy"])
                        ya.append(a["accuracy"])
                    if a.get("mean_tokens") is not None and f.get("mean_tokens") is not None:
                        xt.append(f["mean_tokens"])
                        yt.append(a["mean_tokens"])
            axes[0].scatter(xa, ya, marker=marker, color=colors[j % 2], alpha=0.75, label=f"{label}: vs {forced}")
            axes[1].scatter(xt, yt, marker=marker, color=colors[j % 2], alpha=0.75, label=f"{label}: vs {forced}")
    axes[0].plot([0, 1], [0, 1], "k:", linewidth=1)
    axes[0].set_xlim(-0.05, 1.05)
    axes[0].set_ylim(-0.05, 1.05)
    axes[0].set_xlabel("forced-mode accuracy")
    axes[0].set_ylabel("auto-mode accuracy")
    axes[0].set_title("accuracy per (category, difficulty)")
    hi = max([1.0] + [v for c in axes[1].collections for v in c.get_offsets().flatten().tolist()])
    axes[1].plot([0, hi], [0, hi], "k:", linewidth=1)
    axes[1].set_xlabel("forced-mode mean tokens")
    axes[1].set_ylabel("auto-mode mean tokens")
    axes[1].set_title("tokens per (category, difficulty)")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _mode_table(models: list[tuple[str, dict]], modes: list[str], block_of) -> list[str]:
    head = "| mode | " + " | ".join(f"{lab} acc | {lab} tokens | {lab} think-rate" for lab, _ in models) + " |"
    sep = "|---|" + "---|---|---|" * len(models)
    lines = [head, sep]
    for m in modes:
        cells = []
        for _, rep in models:
            d = (block_of(rep) or {}).get("modes", {}).get(m) or {}
            cells += [_f(d.get("accuracy")), _f(d.get("mean_tokens"), 1), _f(d.get("think_rate"), 2)]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def _group_table(models: list[tuple[str, dict]], modes: list[str], key: str, title: str) -> list[str]:
    groups = sorted({g for _, rep in models for g in rep.get(key, {})})
    if not groups:
        return []
    head = f"| {title} | " + " | ".join(f"{lab} {m} acc" for lab, _ in models for m in modes) \
        + " | " + " | ".join(f"{lab} auto think-rate | {lab} hybrid" for lab, _ in models) + " |"
    sep = "|---|" + "---|" * (len(models) * len(modes) + 2 * len(models))
    lines = [head, sep]
    for g in groups:
        accs, extra = [], []
        for _, rep in models:
            b = rep.get(key, {}).get(g) or {}
            accs += [_f((b.get("modes", {}).get(m) or {}).get("accuracy")) for m in modes]
            extra += [_f((b.get("modes", {}).get("auto") or {}).get("think_rate"), 2), _f(b.get("hybrid_accuracy"))]
        lines.append(f"| {g} | " + " | ".join(accs + extra) + " |")
    return lines


def _cell_table(models: list[tuple[str, dict]], modes: list[str]) -> list[str]:
    """Accuracy per mode, auto think-rate and tokens per (category, level) cell."""
    cells = sorted({c for _, rep in models for c in rep.get("cells", {})},
                   key=lambda c: (c.rpartition("/")[0], _level(c.rpartition("/")[2])))
    if not cells:
        return []
    cols = [f"{m} acc" for m in modes] + ["auto think-rate"] + [f"{m} tokens" for m in modes]
    lines = ["| category | level | " + " | ".join(f"{lab} {c}" for lab, _ in models for c in cols) + " |",
             "|---|---|" + "---|" * (len(cols) * len(models))]
    for cell in cells:
        cat, _, level = cell.rpartition("/")
        vals = []
        for _, rep in models:
            ms = (rep.get("cells", {}).get(cell) or {}).get("modes", {})
            vals += [_f((ms.get(m) or {}).get("accuracy")) for m in modes]
            vals.append(_f((ms.get("auto") or {}).get("think_rate"), 2))
            vals += [_f((ms.get(m) or {}).get("mean_tokens"), 1) for m in modes]
        lines.append(f"| {cat} | {level} | " + " | ".join(vals) + " |")
    return lines


def _sampling_table(models: list[tuple[str, dict]]) -> list[str]:
    """pass@k / maj@k per mode (only when the eval sampled: eval.pass_k)."""
    sampled = [(lab, rep["sampling"]) for lab, rep in models if rep.get("sampling")]
    if not sampled:
        return []
    s0 = sampled[0][1]
    ks = s0["k"]
    lines = ["", "## pass@k and maj@k", "",
             f"{s0['samples_per_item']} answers per item and mode, sampled at temperature {s0['temperature']} "
             f"(seed {s0['seed']}); pass@k is the unbiased estimate from those samples, maj@k the majority answer "
             "of the first k.", "",
             "| model | mode | " + " | ".join(f"pass@{k}" for k in ks) + " | " + " | ".join(f"maj@{k}" for k in ks)
             + " | sampled think-rate | sampled tokens |", "|---|---|" + "---|" * (2 * len(ks) + 2)]
    for lab, smp in sampled:
        for m, d in smp["modes"].items():
            lines.append(f"| {lab} | {m} | " + " | ".join(_f(d.get(f"pass@{k}")) for k in ks) + " | "
                         + " | ".join(_f(d.get(f"maj@{k}")) for k in ks)
                         + f" | {_f(d.get('think_rate'), 2)} | {_f(d.get('mean_tokens'), 1)} |")
    return lines


def _budget_table(models: list[tuple[str, dict]]) -> list[str]:
    """Per thinking budget and mode (only when the eval swept budgets: eval.thinking_budgets)."""
    swept = [(lab, rep["budget_sweep"]) for lab, rep in models if rep.get("budget_sweep")]
    if not swept:
        return []
    lines = ["", "## Thinking budget", "",
             "Auto and think mode answered again under each thinking budget, as `r4b serve` runs it: once the "
             "reasoning has used the budget, the think block is closed with `\\n</think>\\n\\n` and the model "
             "answers; budget 0 is the no-think prompt. Reasoning tokens are the ones a budget counts; "
             "`cut` is the share of answers whose reasoning the budget closed.", "",
             "| model | budget | mode | acc | tokens | reasoning tokens | think-rate | cut |",
             "|---|---|---|---|---|---|---|---|"]
    for lab, sweep in swept:
        blocks = [("none", sweep["unbudgeted"])] + [(b, sweep["by_budget"][str(b)]) for b in sweep["budgets"]]
        for budget, block in blocks:
            for m in sweep["modes"]:
                d = block.get(m) or {}
                cut = "–" if budget == "none" else _f(d.get("closed_by_budget"), 2)
                lines.append(f"| {lab} | {budget} | {m} | {_f(d.get('accuracy'))} | {_f(d.get('mean_tokens'), 1)} | "
                             f"{_f(d.get('mean_reasoning_tokens'), 1)} | {_f(d.get('think_rate'), 2)} | {cut} |")
    return lines


def plot_budget_sweep(report: dict, path: Path) -> Path:
    """Accuracy vs thinking budget: one line per mode (evenly spaced budgets), the unbudgeted
    accuracy of that mode as a dashed line; a compared model dotted."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    colors = {"auto": "tab:green", "think": "tab:red"}
    budgets = sorted({b for _, rep in _models(report) for b in (rep.get("budget_sweep") or {}).get("budgets", [])})
    top = 0.0
    for j, (label, rep) in enumerate(_models(report)):
        sweep = rep.get("budget_sweep")
        if not sweep:
            continue
        for m in sweep["modes"]:
            pts = [(budgets.index(b), (sweep["by_budget"][str(b)].get(m) or {}).get("accuracy")) for b in sweep["budgets"]]
            ax.plot([x for x, _ in pts], [y if y is not None else float("nan") for _, y in pts], ("-", ":")[j % 2],
                    marker="o", color=colors.get(m), label=f"{label}: {m}")
            ref = (sweep["unbudgeted"].get(m) or {}).get("accuracy")
            top = max([top, ref or 0.0] + [y for _, y in pts if y is not None])
            if ref is not None:
                ax.axhline(ref, linestyle="--", linewidth=1, color=colors.get(m), alpha=0.6,
                           label=f"{label}: {m}, no budget")
    ax.set_xticks(range(len(budgets)), [str(b) for b in budgets])
    ax.set_ylim(0, min(1.05, top * 1.25 + 0.05))      # a small model's accuracies stay readable
    ax.set_xlabel("thinking budget (reasoning tokens)")
    ax.set_ylabel("accuracy")
    ax.set_title("accuracy vs thinking budget")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _level(x: str) -> float:
    try:
        return float(x)
    except ValueError:
        return float("inf")


def render_markdown(report: dict) -> str:
    models = _models(report)
    modes = _mode_names(report)
    title = " vs ".join(lab for lab, _ in models)
    lines = [f"# Three-mode evaluation: {title}", ""]
    for lab, rep in models:
        lines.append(f"- **{lab}**: `{rep.get('model', '?')}` ({rep.get('n_items', '?')} items)")
    s = report.get("settings", {})
    if s:
        lines.append(f"- greedy, max {s.get('max_new_tokens')} new tokens, engine {s.get('engine')}")
    lines += ["", "## Per mode", ""] + _mode_table(models, modes, lambda r: r) + [""]
    lines += ["## Did auto mode pick a working mode?", "",
              "hybrid accuracy = share of items where auto is correct, among items that think or "
              "no-think mode answers correctly; oracle = share of items some forced mode answers. "
              "Thinking was needed on an item when forced think answers it and forced no-think does not: "
              "MCC, precision and recall score auto mode's choice to think against that.", "",
              "| model | hybrid accuracy | over items | oracle accuracy | needed | auto thought | MCC | "
              "precision | recall |", "|---|---|---|---|---|---|---|---|---|"]
    for lab, rep in models:
        sel = rep.get("mode_selection") or {}
        lines.append(f"| {lab} | {_f(rep.get('hybrid_accuracy'))} | {_f(rep.get('hybrid_items'))} | "
                     f"{_f(rep.get('oracle_accuracy'))} | {_f(sel.get('needed'))} | {_f(sel.get('thought'))} | "
                     f"{_f(sel.get('mcc'))} | {_f(sel.get('precision'))} | {_f(sel.get('recall'))} |")
    lines += ["", "## Tokens at matched accuracy", "",
              "Auto mode against the cheapest forced mode at least as accurate as auto (none: auto beats both); "
              "then each mode's tokens on the items every mode answers.", "",
              "| model | auto acc | auto tokens | matched mode | its acc | its tokens | auto / matched | "
              "items all right | " + " | ".join(f"{m} tokens there" for m in modes) + " |",
              "|---|---|---|---|---|---|---|---|" + "---|" * len(modes)]
    for lab, rep in models:
        tam = rep.get("tokens_at_matched_accuracy") or {}
        common = rep.get("tokens_where_all_correct") or {}
        lines.append(f"| {lab} | {_f(tam.get('auto_accuracy'))} | {_f(tam.get('auto_tokens'), 1)} | "
                     f"{tam.get('mode') or 'none'} | {_f(tam.get('mode_accuracy'))} | {_f(tam.get('mode_tokens'), 1)} | "
                     f"{_f(tam.get('auto_over_mode'), 2)} | {_f(common.get('items'))} | "
                     + " | ".join(_f(common.get(m), 1) for m in modes) + " |")
    lines += ["", "## By category", ""] + _group_table(models, modes, "by_category", "category")
    lines += ["", "## By difficulty", ""] + _group_table(models, modes, "by_difficulty", "difficulty")
    lines += ["", "## By category and level", ""] + _cell_table(models, modes)
    lines += _sampling_table(models)
    lines += _budget_table(models)
    if len(report.get("benchmarks", {})) > 1:
        lines += ["", "## By benchmark", ""] + _group_table([models[0]], modes, "benchmarks", "benchmark")
    lines += ["", "## Plots", ""]
    lines += [f"![{p.removesuffix('.png')}]({p})" for p in PLOTS + ((BUDGET_PLOT,) if report.get("budget_sweep") else ())]
    tp = report.get("throughput") or {}
    if tp:
        lines += ["", "## Throughput", ""]
        for name, d in tp.items():
            lines.append(f"- {name}: {d.get('items')} items in {d.get('seconds')} s "
                         f"({_f(d.get('items_per_s'), 2)} items/s, {_f(d.get('tokens_per_s'), 0)} tokens/s)")
    return "\n".join(lines) + "\n"


def plot_by_level(report: dict, path: Path) -> Path:
    """One panel per category: accuracy per mode (solid) and auto think-rate (dashed) by level."""
    plt = _plt()
    models = _models(report)
    cats = sorted({c for _, rep in models for c in _cells(rep)}) or ["all"]
    fig, axes = plt.subplots(1, len(cats), figsize=(4.5 * len(cats), 3.8), squeeze=False)
    colors = {"auto": "tab:green", "think": "tab:red", "no_think": "tab:blue"}
    styles = ("-", ":")
    for ax, cat in zip(axes[0], cats):
        for j, (label, rep) in enumerate(models):
            by_level = _cells(rep).get(cat) or {}
            levels = sorted(by_level, key=_level)
            for m in _mode_names(rep):
                ys = [(by_level[lv].get(m) or {}).get("accuracy") for lv in levels]
                ax.plot(levels, [y if y is not None else float("nan") for y in ys], styles[j % 2], marker="o",
                        color=colors[m], label=f"{label}: {m} accuracy")
            ys = [(by_level[lv].get("auto") or {}).get("think_rate") for lv in levels]
            ax.plot(levels, [y if y is not None else float("nan") for y in ys], styles[j % 2], marker="x",
                    color="k", linewidth=2.5, alpha=0.6, label=f"{label}: auto think-rate")
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("level")
        ax.set_title(cat)
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("accuracy / think-rate")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(report: dict, out_dir: Path) -> list[Path]:
    """Render report.md and the PNG plots into `out_dir`; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [plot_accuracy_tokens(report, out_dir / PLOTS[0]), plot_think_rate(report, out_dir / PLOTS[1]),
             plot_auto_vs_forced(report, out_dir / PLOTS[2]), plot_by_level(report, out_dir / PLOTS[3])]
    if report.get("budget_sweep"):
        files.append(plot_budget_sweep(report, out_dir / BUDGET_PLOT))
    md = out_dir / "report.md"
    tmp = md.with_suffix(".md.tmp")
    tmp.write_text(render_markdown(report))
    tmp.replace(md)
    return [md, *files]
