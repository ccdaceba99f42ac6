"""Results tables as they go into a paper: Markdown and LaTeX (booktabs), one row per method (a
group of seeds, see :mod:`lifelong_moe.report.aggregate`), one column per metric, ``mean ± std`` over seeds
(the mean alone for one seed), the best mean of each column in bold (ties: all of them, compared as
printed). Forgetting is better lower; every other metric higher (bwt and fwt: less negative is better).
Accuracy-like runs print in percent with two decimals, others raw with four.
"""
from __future__ import annotations

import math

LOWER_IS_BETTER = frozenset({"forgetting", "vqacl_af"})
LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _num(v: float, percent: bool) -> str:
    return f"{100 * v:.2f}" if percent else f"{v:.4f}"


def table_keys(groups) -> list[str]:
    """Metrics with a value in at least one group, in first-seen order."""
    keys = list(dict.fromkeys(k for g in groups for k in g.metric_keys()))
    return [k for k in keys if any(g.metric(k).mean is not None for g in groups)]


def _cells(groups, keys) -> list[list[tuple[str, str | None, bool]]]:
    """Per group, per key: (mean text, std text or None, bold)."""
    rows = [[(None, None, False)] * len(keys) for _ in groups]
    for j, k in enumerate(keys):
        shown = {}
        for i, g in enumerate(groups):
            s = g.metric(k)
            if s.mean is None:
                rows[i][j] = ("–", None, False)
                continue
            text = _num(s.mean, g.percent)
            shown[i] = float(text)
            rows[i][j] = (text, None if s.std is None else _num(s.std, g.percent), False)
        if shown:
            best = (min if k in LOWER_IS_BETTER else max)(shown.values())
            for i, v in shown.items():
                if math.isclose(v, best):
                    rows[i][j] = (rows[i][j][0], rows[i][j][1], True)
    return rows


def _arrow(key: str, latex: bool) -> str:
    down = key in LOWER_IS_BETTER
    return (r"$\downarrow$" if down else r"$\uparrow$") if latex else ("↓" if down else "↑")


def markdown_table(groups, keys: list[str] | None = None) -> str:
    """``| method | last ↑ | ... |`` with ``**best**`` and ``mean ± std`` cells."""
    keys = table_keys(groups) if keys is None else keys

    def cell(mean, std, bold):
        m = f"**{mean}**" if bold else mean
        return m if std is None else f"{m} ± {std}"

    lines = ["| method | " + " | ".join(f"{k} {_arrow(k, False)}" for k in keys) + " |",
             "|---|" + "".join("---:|" for _ in keys)]
    for g, row in zip(groups, _cells(groups, keys)):
        lines.append(f"| {g.label.replace('|', chr(92) + '|')} | " + " | ".join(cell(*c) for c in row) + " |")
    return "\n".join(lines)


def latex_escape(text: str) -> str:
    return "".join(LATEX_SPECIAL.get(c, c) for c in text)


def latex_table(groups, keys: list[str] | None = None) -> str:
    """A booktabs ``tabular`` (``\\usepackage{booktabs}``) with ``\\textbf{best}`` and ``mean $\\pm$ std``."""
    keys = table_keys(groups) if keys is None else keys

    def cell(mean, std, bold):
        if mean == "–":
            return "--"
        m = f"\\textbf{{{mean}}}" if bold else mean
        return m if std is None else f"{m} $\\pm$ {std}"

    lines = [f"\\begin{{tabular}}{{l{'r' * len(keys)}}}", "\\toprule",
             "Method & " + " & ".join(f"{latex_escape(k)} {_arrow(k, True)}" for k in keys) + " \\\\", "\\midrule"]
    for g, row in zip(groups, _cells(groups, keys)):
        lines.append(f"{latex_escape(g.label)} & " + " & ".join(cell(*c) for c in row) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines)
