"""bench/cache_accuracy.py, run for real in its quick mode (as tests/test_bench.py runs the others)."""
import pytest
from test_bench import number, report, run_bench, table

pytestmark = pytest.mark.slow


def test_bench_cache_accuracy(tmp_path):
    run_bench("cache_accuracy.py", "--results_dir", str(tmp_path))
    rows = table(report(tmp_path, "cache_accuracy"), "image size")
    assert [row[1] for row in rows] == ["files", "raw cache", "compressed cache, quality 90"]
    assert all(0 <= number(row[2]) <= 100 and 0 <= number(row[3]) <= 100 for row in rows)
    assert rows[0][4] == "+0.00" and rows[0][6] == ""  # the files' row is the reference, with no cache
    assert number(rows[1][6]) > 0 and number(rows[2][6]) > 0
