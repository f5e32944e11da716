"""The sandbox's sample domain: a small retail company, generated deterministically into DuckDB."""

from __future__ import annotations

import random
from datetime import date, timedelta

import duckdb
import pandas as pd

CATALOG = "samples"
SCHEMA = "retail"

CITIES = {
    "Seoul": "Capital",
    "Incheon": "Capital",
    "Suwon": "Capital",
    "Busan": "Southeast",
    "Daegu": "Southeast",
    "Ulsan": "Southeast",
    "Gwangju": "Southwest",
    "Daejeon": "Central",
}
SEGMENTS = ["consumer", "business", "vip"]
CATEGORIES = {
    "electronics": (80, 900),
    "home": (10, 200),
    "grocery": (2, 40),
    "beauty": (5, 120),
    "sports": (15, 400),
}
CHANNELS = ["online", "store", "mobile"]
STATUSES = ["completed"] * 8 + ["cancelled", "returned"]

TABLE_COMMENTS = {
    "customers": "One row per customer; city and region of residence, segment and sign-up date.",
    "products": "Product catalogue with category and list price in KRW thousands.",
    "stores": "Physical stores with their city, region and opening date.",
    "orders": "One row per order: customer, store (null for online orders), date, status and channel.",
    "order_items": "Order lines: product, quantity, unit price paid and discount rate (0-0.3).",
}
SYSTEM_CATALOG = "databricks_system"  # DuckDB reserves "system" (and "information_schema" in every catalog)
INFO = f"{SYSTEM_CATALOG}.info"  # the warehouse maps Databricks' system.information_schema here
FOREIGN_KEYS = [
    ("orders", "customer_id", "customers", "customer_id"),
    ("orders", "store_id", "stores", "store_id"),
    ("order_items", "order_id", "orders", "order_id"),
    ("order_items", "product_id", "products", "product_id"),
]


def build_tables(seed: int = 7, scale: int = 1) -> dict[str, pd.DataFrame]:
    """Generate the five related tables; `scale` multiplies the row counts."""
    rng = random.Random(seed)
    cities = list(CITIES)
    customers = pd.DataFrame(
        {
            "customer_id": range(1, 500 * scale + 1),
            "name": [f"Customer {i:04d}" for i in range(1, 500 * scale + 1)],
            "city": [rng.choice(cities) for _ in range(500 * scale)],
            "segment": [rng.choices(SEGMENTS, weights=[7, 2, 1])[0] for _ in range(500 * scale)],
            "signup_date": [date(2021, 1, 1) + timedelta(days=rng.randrange(1300)) for _ in range(500 * scale)],
        }
    )
    customers.insert(3, "region", customers["city"].map(CITIES))
    product_rows = []
    for pid in range(1, 61):
        category = list(CATEGORIES)[pid % len(CATEGORIES)]
        low, high = CATEGORIES[category]
        product_rows.append((pid, f"{category.title()} item {pid:02d}", category, round(rng.uniform(low, high), 2)))
    products = pd.DataFrame(product_rows, columns=["product_id", "name", "category", "unit_price"])
    prices = [row[3] for row in product_rows]
    stores = pd.DataFrame(
        {
            "store_id": range(1, 21),
            "name": [f"{cities[i % len(cities)]} store {i + 1}" for i in range(20)],
            "city": [cities[i % len(cities)] for i in range(20)],
            "opened_date": [date(2018, 3, 1) + timedelta(days=97 * i) for i in range(20)],
        }
    )
    stores.insert(3, "region", stores["city"].map(CITIES))
    order_rows, item_rows = [], []
    for oid in range(1, 4000 * scale + 1):
        channel = rng.choices(CHANNELS, weights=[5, 3, 2])[0]
        store_id = rng.randrange(1, 21) if channel == "store" else None
        order_date = date(2023, 1, 1) + timedelta(days=rng.randrange(730))
        order_rows.append((oid, rng.randrange(1, 500 * scale + 1), store_id, order_date, rng.choice(STATUSES), channel))
        for line_no in range(1, rng.randrange(1, 5) + 1):
            pid = rng.randrange(1, 61)
            price = float(prices[pid - 1])
            discount = rng.choice([0.0, 0.0, 0.0, 0.05, 0.1, 0.2])
            item_rows.append((oid, line_no, pid, rng.randrange(1, 6), price, discount))
    orders = pd.DataFrame(
        order_rows, columns=["order_id", "customer_id", "store_id", "order_date", "status", "channel"]
    )
    orders["store_id"] = orders["store_id"].astype("Int64")
    items = pd.DataFrame(item_rows, columns=["order_id", "line_no", "product_id", "quantity", "unit_price", "discount"])
    return {"customers": customers, "products": products, "stores": stores, "orders": orders, "order_items": items}


def load_into(conn: duckdb.DuckDBPyConnection, seed: int = 7) -> None:
    """Create `samples.retail.*` in `conn`, with table comments and declared foreign keys as comments."""
    conn.execute(f"ATTACH ':memory:' AS {CATALOG}")
    conn.execute(f"CREATE SCHEMA {CATALOG}.{SCHEMA}")
    for name, frame in build_tables(seed).items():
        conn.register("_frame", frame)
        conn.execute(f"CREATE TABLE {CATALOG}.{SCHEMA}.{name} AS SELECT * FROM _frame")
        conn.unregister("_frame")
        conn.execute(f"COMMENT ON TABLE {CATALOG}.{SCHEMA}.{name} IS '{TABLE_COMMENTS[name]}'")
    for table, column, ref_table, ref_column in FOREIGN_KEYS:
        conn.execute(f"COMMENT ON COLUMN {CATALOG}.{SCHEMA}.{table}.{column} IS 'References {ref_table}.{ref_column}'")
    _information_schema(conn)
    conn.execute(f"USE {CATALOG}.{SCHEMA}")


def _information_schema(conn: duckdb.DuckDBPyConnection) -> None:
    """`system.information_schema` as Databricks has it: tables and columns (live views over every catalog,
    the user's too) and the foreign keys of the sample tables as constraints."""
    conn.execute(f"ATTACH ':memory:' AS {SYSTEM_CATALOG}")
    conn.execute(f"CREATE SCHEMA {INFO}")
    conn.execute(
        f"CREATE VIEW {INFO}.tables AS SELECT database_name AS table_catalog, schema_name AS table_schema, "
        f"table_name, comment FROM duckdb_tables() WHERE database_name <> '{SYSTEM_CATALOG}'"
    )
    conn.execute(
        f"CREATE VIEW {INFO}.columns AS SELECT database_name AS table_catalog, "
        "schema_name AS table_schema, table_name, column_name, data_type, column_index AS ordinal_position, "
        f"comment FROM duckdb_columns() WHERE database_name <> '{SYSTEM_CATALOG}'"
    )
    conn.execute(
        f"CREATE TABLE {INFO}.table_constraints (constraint_catalog VARCHAR, "
        "constraint_schema VARCHAR, constraint_name VARCHAR, table_catalog VARCHAR, table_schema VARCHAR, "
        "table_name VARCHAR, constraint_type VARCHAR)"
    )
    for usage in ("key_column_usage", "constraint_column_usage"):
        conn.execute(
            f"CREATE TABLE {INFO}.{usage} (constraint_catalog VARCHAR, constraint_schema VARCHAR, "
            "constraint_name VARCHAR, table_catalog VARCHAR, table_schema VARCHAR, table_name VARCHAR, "
            "column_name VARCHAR, ordinal_position INTEGER)"
        )
    for table, column, ref_table, ref_column in FOREIGN_KEYS:
        name = f"{table}_{column}_fk"
        conn.execute(
            f"INSERT INTO {INFO}.table_constraints VALUES (?, ?, ?, ?, ?, ?, 'FOREIGN KEY')",
            [CATALOG, SCHEMA, name, CATALOG, SCHEMA, table],
        )
        conn.execute(
            f"INSERT INTO {INFO}.key_column_usage VALUES (?, ?, ?, ?, ?, ?, ?, 1)",
            [CATALOG, SCHEMA, name, CATALOG, SCHEMA, table, column],
        )
        conn.execute(
            f"INSERT INTO {INFO}.constraint_column_usage VALUES (?, ?, ?, ?, ?, ?, ?, 1)",
            [CATALOG, SCHEMA, name, CATALOG, SCHEMA, ref_table, ref_column],
        )
