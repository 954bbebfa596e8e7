"""The cross-run report: names of benchmarks and variants, mean ± std over seeds, best λ, runs.csv and pictures."""

import csv
import json
import statistics

import pytest
from omegaconf import OmegaConf
from test_app import QUICK, compose_app

from lightning_ewc.app.report import (
    _slug,
    benchmark_of,
    best_rows,
    main,
    markdown_table,
    plot_bars,
    read_published,
    variant_of,
    write_report,
)
from lightning_ewc.app.runner import run


def plain(*overrides):
    return OmegaConf.to_container(compose_app(*overrides), resolve=False)


def test_benchmark_and_variant_names_follow_the_config():
    task_il = plain("experiment=split_mnist_task_il", "method.callback.num_samples=500")
    assert benchmark_of(task_il) == "split_mnist/task/2000it"
    assert variant_of(task_il) == "ewc (exact, 500) + kept optimizer"  # van de Ven keeps one Adam
    assert variant_of(plain("method=ewc", "method.callback.fisher=batched")) == "ewc (batched)"
    assert variant_of(plain("method=online_ewc")) == "online_ewc (exact)"
    assert variant_of(plain("method=si")) == "si" and variant_of(plain("method=joint")) == "joint"
    latest_only = plain("method=l2", "method.callback.mode=online", "method.callback.gamma=0")
    assert variant_of(latest_only) == "l2 (online, γ=0)"
    assert variant_of(plain("method=online_ewc", "method.callback.gamma=0.9")) == "online_ewc (exact, γ=0.9)"
    assert variant_of(plain("method=si", "method.callback.mode=separate")) == "si (separate)"
    assert variant_of(plain("method=finetune", "train.keep_optimizer_state=true")) == "finetune + kept optimizer"
    assert benchmark_of(plain("experiment=split_mnist_task_il", "stream.class_order=seeded")) == (
        "split_mnist/task/2000it/seeded"
    )
    assert benchmark_of(plain("stream=split_mnist", "stream.class_order=[1,0,2,3,4,5,6,7,8,9]")).endswith("/1023456789")
    assert benchmark_of(plain("experiment=permuted_mnist_10")) == "permuted_mnist/domain/5000it/pad2"
    assert benchmark_of(plain("experiment=permuted_mnist_10", "stream.pad=0")) == "permuted_mnist/domain/5000it"
    hsu = plain("experiment=split_mnist_hsu", "method=finetune")
    assert benchmark_of(hsu) == "split_mnist/task/4ep" and variant_of(hsu) == "finetune"


def test_report_averages_seeds_picks_the_best_lambda_and_draws(tmp_path):
    runs = tmp_path / "runs"
    results = {}
    for lam in (1.0, 1e4):
        for seed in (0, 1):
            out = runs / f"lam{lam:g}_seed{seed}"
            results[(lam, seed)] = run(compose_app(*QUICK, "stream.num_tasks=3", f"seed={seed}",
                                                   f"method.callback.ewc_lambda={lam}", f"output_dir={out}"))
    (runs / "broken").mkdir()
    (runs / "broken" / "results.json").write_text("{not json")  # a job that died mid-write is skipped

    report = tmp_path / "report"
    with pytest.warns(UserWarning, match="skipping unreadable"):
        best = write_report(runs, report, heatmaps=("ewc (exact)",))

    with open(report / "runs.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and {r["benchmark"] for r in rows} == {"digits/task/6it"}
    means = {lam: statistics.fmean(results[(lam, s)]["avg_acc"] for s in (0, 1)) for lam in (1.0, 1e4)}
    (chosen,) = best
    want = max(means, key=means.get)
    assert chosen["ewc_lambda"] == want and chosen["seeds"] == [0, 1]
    assert chosen["mean"] == pytest.approx(means[want])
    assert chosen["std"] == pytest.approx(statistics.stdev(results[(want, s)]["avg_acc"] for s in (0, 1)))
    first = [results[(want, s)]["acc_matrix"][2][0] for s in (0, 1)]
    assert chosen["mean_R"][2][0] == pytest.approx(statistics.fmean(first))

    table = (report / "table.md").read_text()
    assert f"{100 * means[want]:.2f} ± " in table and table.count("| digits/task/6it | ewc (exact) |") == 3
    assert (report / "results_bars.png").stat().st_size > 1000
    assert (report / "heatmap_digits_task_6it_ewc-exact.png").stat().st_size > 1000


def test_report_command_prints_the_best_rows(tmp_path, capsys):
    out = tmp_path / "runs" / "one"
    result = run(compose_app(*QUICK, "stream.num_tasks=2", "method=finetune", f"output_dir={out}"))
    main([str(tmp_path / "runs"), "--out", str(tmp_path / "report")])
    printed = capsys.readouterr().out
    assert f"| digits/task/6it | finetune | — | 0 | {100 * result['avg_acc']:.2f} |" in printed
    assert json.loads((out / "results.json").read_text())["avg_acc"] == result["avg_acc"]


def group(variant, lam, seeds, mean):
    return {"benchmark": "b/task/1it", "variant": variant, "ewc_lambda": lam, "seeds": seeds, "mean": mean,
            "std": 0.01 if len(seeds) > 1 else None, "bwt": -0.02, "mean_R": [[mean]]}


def test_best_lambda_prefers_the_lambda_repeated_over_more_seeds():
    # λ chosen on seed 0, then repeated: a lucky single seed at another λ must not displace the 3-seed mean
    groups = [group("ewc", 1.0, [0], 0.99), group("ewc", 10.0, [0, 1, 2], 0.97), group("ewc", 100.0, [0], 0.95),
              group("si", 1.0, [0], 0.90), group("si", 2.0, [0], 0.92)]
    best = {g["variant"]: g for g in best_rows(groups)}
    assert best["ewc"]["ewc_lambda"] == 10.0 and best["si"]["ewc_lambda"] == 2.0
    assert [g["variant"] for g in best_rows(groups, min_seeds=3)] == ["ewc"]


def test_heatmap_file_names_are_readable():
    assert _slug("ewc (exact, 500) + kept optimizer") == "ewc-exact-500-kept-optimizer"


def test_published_values_join_the_table_and_the_chart(tmp_path):
    csv_path = tmp_path / "published.csv"
    csv_path.write_text("benchmark,variant,published,source\nb/task/1it,ewc,98.5,paper\nb/task/1it,si,,none\n")
    published = read_published(csv_path)
    assert published == {("b/task/1it", "ewc"): 98.5}
    best = best_rows([group("ewc", 10.0, [0, 1, 2], 0.97), group("si", 2.0, [0], 0.92)])
    table = markdown_table(best, published).splitlines()
    assert table[0].endswith("| published (%) |") and table[2].endswith("| 98.5 |") and table[3].endswith("| — |")
    assert plot_bars(best, tmp_path / "bars.png", published).stat().st_size > 1000

    (tmp_path / "unquoted.csv").write_text("benchmark,variant,published\nb,ewc (exact, 500),98.9\n")
    with pytest.raises(ValueError, match="line 2: published value '500\\)' is not a number.*double quotes"):
        read_published(tmp_path / "unquoted.csv")
    (tmp_path / "bad.csv").write_text("bench,variant,value\nb,ewc,1\n")
    with pytest.raises(ValueError, match="needs the columns benchmark, variant, published; missing"):
        read_published(tmp_path / "bad.csv")


def test_an_earlier_runs_csv_joins_the_runs_found(tmp_path, capsys):
    # Seed 0 ran earlier and only its runs.csv is left; seeds 1 and 2 have their folders; seed 2 is also in the
    # old file with a stale value that the folder must override.
    results = {}
    for seed in (0, 1, 2):
        out = tmp_path / ("old" if seed == 0 else "runs") / f"seed{seed}"
        results[seed] = run(compose_app(*QUICK, "stream.num_tasks=2", "method=finetune", f"seed={seed}",
                                        f"output_dir={out}"))
    write_report(tmp_path / "old", tmp_path / "old_report")
    old_csv = tmp_path / "old_report" / "runs.csv"
    with open(old_csv, newline="") as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["num_tasks"] == "2" and row["tasks_done"] == "2"
    stale = dict(row, seed="2", avg_acc="0.0")
    unfinished = dict(row, seed="7", tasks_done="1")  # a run cut off after its first task: not averaged
    with open(old_csv, "a", newline="") as handle:
        csv.DictWriter(handle, fieldnames=list(row)).writerows([stale, unfinished])

    main([str(tmp_path / "runs"), "--out", str(tmp_path / "report"), "--include", str(old_csv)])
    (best,) = write_report(tmp_path / "runs", tmp_path / "report", include=(old_csv,))
    accs = [results[s]["avg_acc"] for s in (0, 1, 2)]
    assert best["seeds"] == [0, 1, 2] and best["mean"] == pytest.approx(statistics.fmean(accs))
    assert best["matrix_seeds"] == 2  # the heatmap averages the runs that still have their matrix
    assert f"| 0,1,2 | {100 * statistics.fmean(accs):.2f} ± " in capsys.readouterr().out
    with open(tmp_path / "report" / "runs.csv", newline="") as handle:
        assert sorted(int(r["seed"]) for r in csv.DictReader(handle)) == [0, 1, 2, 7]  # the record keeps all

    (tmp_path / "old.csv").write_text("benchmark,variant,ewc_lambda,seed,avg_acc\nb,finetune,,0,0.5\n")
    with pytest.raises(ValueError, match="missing .*num_tasks.*add it, or write the file again"):
        write_report(tmp_path / "runs", tmp_path / "r2", include=(tmp_path / "old.csv",))
