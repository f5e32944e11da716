"""Loading a user's tables into the sandbox (`batchflows sandbox --data`): 8 Parquet tables of about
15 MB in all. Prints the load time and the row counts; asserts nothing on speed.

    .venv/bin/python bench/sandbox_load.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pandas as pd

from sandbox import Sandbox


def main() -> None:
    rng = np.random.default_rng(7)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for i in range(8):
            n = 250_000
            folder = root if i < 4 else root / "sales"
            folder.mkdir(exist_ok=True)
            pd.DataFrame(
                {
                    "id": np.arange(n),
                    "amount": rng.normal(100, 30, n).round(2),
                    "qty": rng.integers(1, 20, n),
                    "region": rng.choice(["north", "south", "east", "west"], n),
                    "day": pd.to_datetime("2024-01-01") + pd.to_timedelta(rng.integers(0, 365, n), unit="D"),
                }
            ).to_parquet(folder / f"table_{i}.parquet", index=False)
        size = sum(p.stat().st_size for p in root.rglob("*.parquet")) / 1e6
        t0 = time.monotonic()
        sb = Sandbox(data=str(root))
        load_s = time.monotonic() - t0
        tables = sb.workspace.warehouse.user_tables
        print(f"{len(tables)} Parquet tables, {size:.1f} MB, 2,000,000 rows: loaded in {load_s:.2f} s")
        t0 = time.monotonic()
        result = sb.workspace.warehouse.run("SELECT region, SUM(amount) FROM sales.table_7 GROUP BY region")
        print(
            f"a GROUP BY over 250,000 rows: {time.monotonic() - t0:.3f} s, {len(result['result']['data_array'])} rows"
        )


if __name__ == "__main__":
    main()
