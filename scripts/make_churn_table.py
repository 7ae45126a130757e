"""Write configs/data/churn.csv: a synthetic, mixed-type customer-churn table, deterministic in --seed.

Numeric, integer, boolean, yes/no and categorical columns (3 to 40 levels, some rare), missing
values in several feature columns and in a few targets, and an identifier column: the shapes of
an ordinary business table, generated here because no data may be downloaded at run time.
`python scripts/make_churn_table.py` rewrites the committed file byte for byte.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

OUT = Path(__file__).resolve().parents[1] / "configs" / "data" / "churn.csv"


def make(rows: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    tenure = rng.integers(0, 73, rows)
    monthly = np.round(rng.uniform(18, 120, rows), 2)
    contract = rng.choice(["month-to-month", "one_year", "two_year"], rows, p=[0.55, 0.25, 0.20])
    payment = rng.choice(["electronic_check", "mailed_check", "bank_transfer", "credit_card", "crypto"], rows,
                         p=[0.34, 0.22, 0.22, 0.218, 0.002])
    internet = rng.choice(["dsl", "fiber", "none"], rows, p=[0.35, 0.45, 0.20]).astype(object)
    senior = rng.random(rows) < 0.16
    paperless = np.where(rng.random(rows) < 0.6, "yes", "no")
    weights = 1.0 / np.arange(1, 41) ** 1.3
    region = rng.choice([f"R{i:02d}" for i in range(1, 41)], rows, p=weights / weights.sum())
    calls = pd.array(rng.poisson(1.5, rows), dtype="Int64")  # integers with missing values
    total = np.round(tenure * monthly * rng.uniform(0.9, 1.1, rows), 2)
    logit = (-1.2 - 0.045 * tenure + 0.018 * (monthly - 60) + 1.3 * (contract == "month-to-month")
             - 0.9 * (contract == "two_year") + 0.7 * (payment == "electronic_check") + 0.6 * (internet == "fiber")
             + 0.4 * senior + 0.3 * (paperless == "yes") + 0.35 * calls + rng.normal(0, 0.5, rows))
    churn = np.where(rng.random(rows) < 1 / (1 + np.exp(-logit)), "yes", "no").astype(object)
    frame = pd.DataFrame({
        "customer_id": [f"C-{i:06d}" for i in range(1, rows + 1)],
        "tenure_months": pd.array(tenure, dtype="Int64"),
        "monthly_charges": monthly,
        "total_charges": total,
        "contract": contract,
        "payment_method": payment,
        "internet": internet,
        "senior": senior,
        "paperless": paperless,
        "region": region,
        "support_calls": calls,
        "churn": churn,
    })
    for column, rate in (("tenure_months", 0.03), ("total_charges", 0.05), ("internet", 0.04), ("support_calls", 0.02)):
        frame.loc[rng.random(rows) < rate, column] = None
    frame.loc[rng.random(rows) < 0.01, "churn"] = None
    return frame


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--seed", type=int, default=20261202)
    p.add_argument("--output", type=Path, default=OUT)
    args = p.parse_args()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    make(args.rows, args.seed).to_csv(args.output, index=False, lineterminator="\n")
    print(f"wrote {args.rows} rows to {args.output}")


if __name__ == "__main__":
    main()
