"""Markdown tables (and the plot) from the JSON of the end-to-end benchmark.

    python benchmarks/model_report.py results/bench_model/model.json                 # print the tables
    python benchmarks/model_report.py RUN.json --plot docs/bench_model_h100.png \
        --docs docs/benchmarks.md                                                   # fill the docs section

Several JSON files are merged (a row measured again in a later file replaces the earlier
one: same model, measurement, batch, layers, length and system). With ``--docs``, the text
between the markers ``<!-- model-bench:begin -->`` and ``<!-- model-bench:end -->`` of that
file is replaced by the tables.
"""

from __future__ import annotations

import argparse
import json
import sys

from tensorized_attention import bench_model

BEGIN, END = "<!-- model-bench:begin -->", "<!-- model-bench:end -->"


def load(paths):
    """One result holding the rows of every file (later files win), the first file's device."""
    merged, rows, commands = None, {}, []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        commands.append(data.get("command", ""))
        if data.get("schema") != bench_model.SCHEMA:
            raise ValueError(f"{path}: not a bench model result (schema {data.get('schema')!r})")
        merged = merged or data
        for row in data["rows"]:
            key = (row["model"], row["measurement"], row["batch"], row["layers_measured"], row["N"], row["system"])
            rows.pop(key, None)
            rows[key] = row
    return dict(merged, rows=list(rows.values()), command=" ; ".join(commands))


def fill_docs(path, text):
    with open(path) as f:
        doc = f.read()
    if BEGIN not in doc or END not in doc:
        raise ValueError(f"{path} has no {BEGIN} ... {END} markers")
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(path, "w") as f:
        f.write(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", nargs="+", help="model.json files of bench model runs")
    p.add_argument("--plot", default=None, help="write the log-log plot here (PNG)")
    p.add_argument("--docs", default=None, help="replace the marked section of this Markdown file")
    args = p.parse_args(argv)
    try:
        result = load(args.json)
    except (OSError, ValueError, KeyError) as err:
        print(f"model_report: error: {err}", file=sys.stderr)
        return 2
    text = bench_model.format_markdown(result)
    print(text)
    print("Summary (tensorized against the faster SDPA backend):")
    for line in bench_model.summary(result):
        print(f"- {line}")
    if args.plot:
        print(f"wrote {bench_model.plot(result, args.plot)}", file=sys.stderr)
    if args.docs:
        fill_docs(args.docs, text)
        print(f"updated {args.docs}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
