"""Run the benchmarks and write bench/results/{results.json, report.md, report.png}.

    python bench/run.py [pytest args, e.g. -k bce]
"""
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "results")


def main(argv):
    os.makedirs(OUT, exist_ok=True)
    js = os.path.join(OUT, "results.json")
    cmd = [sys.executable, "-m", "pytest", HERE, "-q", "-p", "no:cacheprovider", "--benchmark-only",
           f"--benchmark-json={js}", "--benchmark-warmup=on", "--benchmark-min-rounds=5",
           "--benchmark-max-time=0.5", "--benchmark-columns=median,iqr,rounds",
           "--benchmark-sort=name", *argv]
    r = subprocess.run(cmd, cwd=HERE)
    if not os.path.exists(js):
        return r.returncode or 1
    from report import write_report  # bench/report.py
    md = write_report(js, OUT)
    print(open(md).read())
    print(f"written: {js}, {md}, {os.path.join(OUT, 'report.png')}")
    return r.returncode


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    sys.exit(main(sys.argv[1:]))
