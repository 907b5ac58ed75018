"""pytest-benchmark JSON -> markdown table of side-by-side ratios + a PNG bar plot.

Ratios are median(other) / median(gankern): > 1 means gankern is faster.  Only numbers
from the same run are compared.
"""
import json
import os
import platform
from collections import defaultdict


def _load(js):
    data = json.load(open(js))
    rows = defaultdict(dict)  # (op, passes, shape, dtype) -> impl -> median seconds
    for b in data["benchmarks"]:
        e = b.get("extra_info", {})
        if "impl" not in e:
            continue
        rows[(e["op"], e["passes"], e["shape"], e["dtype"])][e["impl"]] = b["stats"]["median"]
    return data, rows


def write_report(js, out_dir):
    data, rows = _load(js)
    mi = data.get("machine_info", {})
    lines = [f"# gankern benchmarks", "",
             f"Machine: {mi.get('cpu', {}).get('brand_raw', platform.processor())}, "
             f"{os.cpu_count()} cores; torch threads: see extra_info; medians from one run (pytest-benchmark).",
             "Ratio = other / gankern (>1: gankern faster).", "",
             "| op | passes | shape | dtype | gankern | time | eager | compile | floor | vs eager | vs compile | vs floor |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    tut = any("tutorial" in impls for impls in rows.values())  # e.g. the GAN training step
    if tut:
        lines[-2] += " tutorial | vs tutorial |"
        lines[-1] += "---|---|"
    plot = []
    for key in sorted(rows):
        impls = rows[key]
        for g in sorted(k for k in impls if k.startswith("gankern")):
            t = impls[g]
            def cell(name):
                return f"{impls[name] * 1e6:.1f} us" if name in impls else "-"
            def ratio(name):
                return f"{impls[name] / t:.2f}x" if name in impls else "-"
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {g} | {t * 1e6:.1f} us | {cell('eager')} | "
                         f"{cell('compile')} | {cell('floor')} | {ratio('eager')} | {ratio('compile')} | "
                         f"{('%.2fx' % (t / impls['floor'])) + ' of floor' if 'floor' in impls else '-'} |"
                         + (f" {cell('tutorial')} | {ratio('tutorial')} |" if tut else ""))
            plot.append((f"{key[0]} {key[1]} {key[2]} {key[3]}", impls.get("eager", 0) / t, impls.get("compile", 0) / t))
    md = os.path.join(out_dir, "report.md")
    with open(md, "w") as f:
        f.write("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        if plot:
            fig, ax = plt.subplots(figsize=(10, max(3, 0.28 * len(plot))))
            ys = range(len(plot))
            ax.barh([y + 0.2 for y in ys], [p[1] for p in plot], height=0.4, label="eager / gankern")
            ax.barh([y - 0.2 for y in ys], [p[2] for p in plot], height=0.4, label="compile / gankern")
            ax.axvline(1.0, color="k", lw=0.8)
            ax.set_yticks(list(ys), [p[0] for p in plot], fontsize=6)
            ax.set_xlabel("speed-up of gankern (x)")
            ax.legend()
            fig.tight_layout()
            fig.savefig(os.path.join(out_dir, "report.png"), dpi=120)
    except ImportError:
        pass
    return md
