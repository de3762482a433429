"""The per-layer chart: kept MLP neurons, query heads and KV heads of every layer (removed layers marked), and after a
sparsity stage each layer's share of non-zero linear weights, as
self-contained HTML (no scripts, no external assets) that reads well in light and dark mode."""
from __future__ import annotations

import html

COLUMNS = (("intermediate_size", "MLP neurons"), ("num_attention_heads", "query heads"),
           ("num_key_value_heads", "KV heads"))
NONZERO = "nonzero_weights"  # a sparsity stage: the layer's share of non-zero linear weights (shapes unchanged)
COLORS = {"intermediate_size": "#6366f1", "num_attention_heads": "#0ea5e9", "num_key_value_heads": "#14b8a6",
          NONZERO: "#f59e0b"}
_SKIPS = {"intermediate_size": "mlp", "num_attention_heads": "attention", "num_key_value_heads": "attention"}


def _size(layer: dict, key: str) -> int:
    return 0 if _SKIPS[key] in layer.get("skip", []) else int(layer[key])


def layer_rows(before: list[dict], after: list[dict], removed: list[int] | None = None) -> list[dict]:
    """One row per original layer: {layer, removed, <key>: (kept, original)} for the three sizes.

    `before`/`after` are `PruneResult.layers()`-style dicts; when layers were removed, `removed` names the original
    indices that are gone (depth pruning's report) and the remaining ones map onto `after` in order.
    """
    if len(after) == len(before):
        mapping = {layer["layer"]: new for layer, new in zip(before, after)}
    else:
        gone = set(removed or [])
        if len(gone) != len(before) - len(after):  # not from the core's methods; stay readable anyway
            gone = {layer["layer"] for layer in before[len(after):]}
        mapping = dict(zip([layer["layer"] for layer in before if layer["layer"] not in gone], after))
    rows = []
    for layer in before:
        i = layer["layer"]
        new = mapping.get(i)
        row = {"layer": i, "removed": new is None}
        for key, _ in COLUMNS:
            row[key] = (_size(new, key) if new else 0, _size(layer, key))
        rows.append(row)
    return rows


def add_sparsity(rows: list[dict], sparsity: dict) -> None:
    """Add each layer's share of non-zero decoder-linear weights (a sparsity stage's measurement) to its row."""
    kept = {entry["layer"]: 1 - entry["sparsity"] for entry in sparsity["layers"]}
    for row in rows:
        if row["layer"] in kept:
            row[NONZERO] = kept[row["layer"]]


def _bar(color: str, pct: float, text: str) -> str:
    return (f'<td class="cell"><div class="bar" style="background:rgba(127,127,127,.18);border-radius:4px;'
            f'height:10px;overflow:hidden"><div style="width:{pct:.1f}%;height:100%;background:{color}">'
            f'</div></div><div class="num" style="font-size:12px;opacity:.85">{text}</div></td>')


def _cell(key: str, kept: int, total: int) -> str:
    pct = 100 * kept / total if total else 0
    return _bar(COLORS[key], pct, f'{kept:,} / {total:,} <span style="opacity:.7">({pct:.0f}%)</span>')


def chart_html(rows: list[dict]) -> str:
    columns = COLUMNS + ((NONZERO, "non-zero linear weights"),) if any(NONZERO in r for r in rows) else COLUMNS
    head = "".join(f'<th style="text-align:left;padding:4px 8px">{html.escape(label)}</th>' for _, label in columns)
    body = []
    for row in rows:
        label = f'<td style="padding:4px 8px;white-space:nowrap"><b>{row["layer"]}</b></td>'
        if row["removed"]:
            cells = (f'<td colspan="{len(columns)}" style="padding:4px 8px;font-size:12px;color:#ef4444">'
                     "layer removed</td>")
        else:
            cells = "".join(_cell(key, *row[key]) for key, _ in COLUMNS)
            if len(columns) > len(COLUMNS):
                share = 100 * row.get(NONZERO, 1.0)
                cells += _bar(COLORS[NONZERO], share, f"{share:.1f}%")
        body.append(f'<tr data-layer="{row["layer"]}" data-removed="{str(row["removed"]).lower()}">{label}{cells}</tr>')
    return ('<div class="layer-chart"><table style="width:100%;border-collapse:collapse">'
            f'<thead><tr><th style="text-align:left;padding:4px 8px">layer</th>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>'
            '<style>.layer-chart td.cell{padding:4px 8px;min-width:120px}</style></div>')
