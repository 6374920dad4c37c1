"""`ddp-fnn bench`: size parsing, a world-size-1 run without torchrun, and a real
two-process Gloo run under torchrun checked against its JSON contract and against a bare
all_reduce loop timed in the same run."""

import json
import time

import pytest
from click.testing import CliRunner

from ddp_fnn.perfmodel import bench
from ddp_fnn.core import fileio
from ddp_fnn.cli import cli
from tests.conftest import run_cli, torchrun


def test_parse_sizes_ranges_and_lists():
    assert bench.parse_sizes("4K:64K") == (4096, 8192, 16384, 32768, 65536)
    assert bench.parse_sizes("1K:1M:4") == (1024, 4096, 16384, 65536, 262144, 1048576)
    assert bench.parse_sizes("4K,1M,8M") == (4096, 2 ** 20, 8 * 2 ** 20)
    assert bench.parse_sizes("512") == (512,)
    assert bench.parse_sizes("1KiB:2KB") == (1024, 2048)
    assert bench.parse_size("1G") == 2 ** 30


@pytest.mark.parametrize("text, message", [
    ("4Q", "bad size '4Q'"), ("64M:4K", "need 1 <= LO <= HI"), ("4K:8K:1", "FACTOR must be an integer >= 2"),
    ("1:2:3:4", "expected LO:HI or LO:HI:FACTOR"), ("0,4K", "sizes must be >= 1 byte"),
])
def test_parse_sizes_bad_input_names_it(text, message):
    with pytest.raises(ValueError, match=message):
        bench.parse_sizes(text)


@pytest.mark.parametrize("args, message", [
    (["--sizes", "4K:1Q"], "--sizes: bad size '1Q'"),
    (["--iters", "0"], "--iters must be >= 1, got 0"),
    (["--compare-bare", "huge"], "--compare-bare: bad size 'huge'"),
    (["--timeout-s", "0"], "--timeout-s must be > 0, got 0.0"),
])
def test_bench_bad_options_are_one_line_exit_2(args, message):
    res = CliRunner().invoke(cli, ["bench", *args])
    assert res.exit_code == 2
    assert message in res.output and len(res.output.strip().splitlines()) == 1


def test_bench_sizes_must_hold_whole_elements():
    proc = run_cli("bench", "--sizes", "6", "--dtype", "float32", "--compare-bare", "0", timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "ddp-fnn: error: size 6 B is not a whole number of float32 elements (4 B each)"


def test_world_size_one_without_torchrun(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_cli("bench", "--sizes", "4K:64K", "--iters", "3", "--warmup", "1", "--dtype", "float16",
                   "--compare-bare", "16K", "--compare-rounds", "2", "--json", str(out),
                   env={"OMP_NUM_THREADS": "1"}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = fileio.loads(out.read_text())                 # strict JSON: null, never NaN
    assert report["world_size"] == 1 and report["backend"] == "gloo"
    assert [r["bytes"] for r in report["results"]] == [4096, 8192, 16384, 32768, 65536]
    assert [r["count"] for r in report["results"]] == [2048, 4096, 8192, 16384, 32768]
    for r in report["results"]:
        assert r["time_s"] > 0 and r["busbw_bytes_per_second"] == 0.0
        assert r["algbw_bytes_per_second"] == pytest.approx(r["bytes"] / r["time_s"])
    # Nothing crossed a network: no fit, and the table says why.
    assert report["alpha_s"] is None and report["beta_bytes_per_second"] is None
    assert "world size 1: nothing crosses the network" in proc.stdout
    assert report["compare_bare"]["bytes"] == 16384


@pytest.mark.slow
def test_two_gloo_ranks_default_run_keeps_the_contract_and_matches_a_bare_loop(tmp_path):
    out = tmp_path / "out.json"
    t0 = time.monotonic()
    proc = torchrun(2, "bench", "--json", str(out), timeout=300)
    wall = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    print(proc.stdout)
    print(f"default bench wall time {wall:.1f} s")

    # The default run is sized for a small CPU machine.
    assert wall < 60, f"default bench took {wall:.1f} s"
    # The contract `estimate --bench-json` and others read.
    assert report["world_size"] == 2 and report["backend"] == "gloo"
    sizes = [r["bytes"] for r in report["results"]]
    assert sizes == [4096 * 2 ** k for k in range(14)]          # 4 KiB .. 32 MiB doubling
    for r in report["results"]:
        assert r["time_min_s"] <= r["time_s"] <= r["time_max_s"]
        assert r["algbw_bytes_per_second"] == pytest.approx(r["bytes"] / r["time_s"])
        assert r["busbw_bytes_per_second"] == pytest.approx(r["algbw_bytes_per_second"] * 2 * (2 - 1) / 2)
        assert r["count"] == r["bytes"] // 4 and r["dtype"] == "float32"
    assert report["alpha_s"] >= 0 and report["beta_bytes_per_second"] > 0
    assert report["fit"]["points"] == 14 and report["fit"]["rms_error_s"] >= 0
    # Rank 0 alone printed the table: one header, one row per size.
    assert proc.stdout.count("# ddp-fnn bench:") == 1
    rows = [line.split() for line in proc.stdout.splitlines() if line.strip() and not line.startswith("#")]
    assert [int(r[0]) for r in rows] == sizes and all(r[2] == "float" for r in rows)

    # Timing each call one by one (the harness) against back-to-back calls timed as a
    # whole, alternated in the same run: within 10%.
    cmp = report["compare_bare"]
    assert cmp["bytes"] == 8 * 2 ** 20
    print(f"busbw at 8 MiB: harness {cmp['harness_busbw_bytes_per_second'] / 1e9:.3f} GB/s, "
          f"bare {cmp['bare_busbw_bytes_per_second'] / 1e9:.3f} GB/s, ratio {cmp['ratio']:.3f}")
    assert 0.9 <= cmp["ratio"] <= 1.1, cmp


# ---------------------------------------------------------------------------------------
# a bench file read by estimate and by train's prediction alike
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("algorithm", ["ring", "tree", "halving-doubling"])
def test_estimate_and_the_prediction_take_the_same_alpha_from_a_bench_file(tmp_path, algorithm):
    from ddp_fnn.perfmodel import predict
    path = tmp_path / "bench.json"
    # A 4-rank Gloo bench: its 300 us is a ring all-reduce's latency, 2(N-1) = 6 steps of
    # 50 us, whatever algorithm the estimate then projects to (a tree at 4 ranks would be
    # 4 steps, and 75 us the wrong alpha).
    path.write_text(json.dumps({"world_size": 4, "backend": "gloo", "results": [],
                                "alpha_s": 300e-6, "beta_bytes_per_second": 1e9}))
    res = CliRunner().invoke(cli, ["estimate", "--layers", "32,256,256,1", "--world-size", "8",
                                   "--compute-ms", "1", "--algorithm", algorithm, "--bench-json", str(path),
                                   "--json"])
    assert res.exit_code == 0, res.output
    from_predict = predict.alpha_per_step(predict.read_bench_json(path))
    assert fileio.loads(res.output)["alpha_s"] == from_predict == pytest.approx(50e-6)


def test_a_bench_file_without_a_fit_is_one_line_for_estimate_as_for_train(tmp_path):
    from ddp_fnn.config import ConfigError
    from ddp_fnn.perfmodel import predict
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"world_size": 1, "alpha_s": None, "beta_bytes_per_second": None}))
    res = CliRunner().invoke(cli, ["estimate", "--world-size", "8", "--compute-ms", "1", "--bench-json", str(path)])
    with pytest.raises(ConfigError) as e:
        predict.read_bench_json(path)
    assert res.exit_code == 2 and res.output.strip() == f"Error: {e.value}"
    assert "no alpha-beta fit (world size 1); run the bench with 2 or more ranks" in str(e.value)


# ---------------------------------------------------------------------------------------
# the pre-training probe always answers
# ---------------------------------------------------------------------------------------

def test_probe_fit_is_least_squares_when_the_times_grow():
    from ddp_fnn.perfmodel.probe import fit_probe
    sizes = [4096, 16384, 65536, 262144, 1048576]
    times = [1e-4 + s / 1e9 for s in sizes]                  # alpha 100 us, beta 1 GB/s at N = 2
    got = fit_probe(sizes, times, 2)
    assert got["method"] == "least-squares"
    assert got["alpha_s"] == pytest.approx(1e-4) and got["beta_bytes_per_second"] == pytest.approx(1e9)


def test_probe_falls_back_to_two_points_where_least_squares_finds_no_line():
    from ddp_fnn.perfmodel.probe import fit_probe
    sizes = [4096, 16384, 65536, 262144, 1048576]
    # Noise: the middle sizes are slower than the largest, so the line's slope comes out <= 0.
    times = [1.0e-3, 9.0e-3, 9.0e-3, 9.0e-3, 1.2e-3]
    got = fit_probe(sizes, times, 2)
    assert got["method"] == "two-point" and "cannot fit" in got["fallback_because"]
    assert got["beta_bytes_per_second"] == pytest.approx((1048576 - 4096) / 0.2e-3)
    assert 0 <= got["alpha_s"] < 1e-3


def test_probe_falls_back_to_the_largest_size_when_even_two_points_fall():
    from ddp_fnn.perfmodel.probe import fit_probe
    sizes = [4096, 1048576]
    got = fit_probe(sizes, [2e-3, 1e-3], 4)
    assert got["method"] == "largest" and got["alpha_s"] == 0.0
    assert got["beta_bytes_per_second"] == pytest.approx(1048576 * 1.5 / 1e-3)   # 2(N-1)/N at N = 4


def test_probe_keeps_the_middle_half_of_its_rounds():
    from ddp_fnn.perfmodel.probe import interquartile_mean
    assert interquartile_mean([1, 2, 3, 4, 100]) == 3                  # the burst (100) and the best (1) dropped
    assert interquartile_mean([5, 1, 100, 2, 3, 4, 6, 50]) == pytest.approx((3 + 4 + 5 + 6) / 4)
    assert interquartile_mean([2.0, 4.0]) == 3.0                        # fewer than 4: the plain mean


def test_probe_retries_larger_where_the_largest_size_is_not_slower_than_noise():
    from ddp_fnn.perfmodel.probe import PROBE_MAX_TOP_BYTES, PROBE_MIN_SPREAD, probe_retry_top
    mib = 1 << 20
    # Loopback: 1 MiB takes about what 4 KiB does, so the line is noise: try 16 MiB.
    assert probe_retry_top(mib, "least-squares", [1.0e-3, 1.1e-3, 1.2e-3, 1.5e-3, 2.0e-3]) == 16 * mib
    # A fallback is retried too, whatever the spread.
    assert probe_retry_top(mib, "two-point", [1e-3, 6e-3, 6e-3, 6e-3, 5e-3]) == 16 * mib
    # The largest size is PROBE_MIN_SPREAD times the smallest and takes PROBE_MIN_TOP_S:
    # the bytes set the slope, no retry.
    assert probe_retry_top(mib, "least-squares", [1e-3, 2e-3, 3e-3, 5e-3, PROBE_MIN_SPREAD * 2e-3]) is None
    # The spread alone is not enough where the largest size is faster than scheduling noise.
    assert probe_retry_top(mib, "least-squares", [0.4e-3, 1e-3, 2e-3, 3e-3, 4e-3]) == 16 * mib
    # No larger than PROBE_MAX_TOP_BYTES, or the largest bucket when that is larger already.
    assert probe_retry_top(8 * mib, "largest", [1e-3, 1e-3]) == PROBE_MAX_TOP_BYTES
    assert probe_retry_top(PROBE_MAX_TOP_BYTES, "largest", [1e-3, 1e-3]) is None
    assert probe_retry_top(100 * mib, "largest", [1e-3, 1e-3]) is None
    # No larger than one call of PROBE_RETRY_MAX_CALL_S at the first largest size's rate:
    # 1 MiB in 10 ms allows 10 MiB; 1.5 MB in 100 ms (4 namespace nodes, a 14 ms smallest
    # size) allows nothing 4 times larger, so no retry.
    assert probe_retry_top(mib, "least-squares", [2e-3, 4e-3, 6e-3, 8e-3, 10e-3]) == 10 * mib
    assert probe_retry_top(1_600_000, "least-squares", [14e-3, 16e-3, 20e-3, 40e-3, 100e-3]) is None
