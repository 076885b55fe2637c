"""Cross-checks between the loaded catalog and what the rules need (refuse to start on a gap)."""

from __future__ import annotations

from pathlib import Path

from service.cds.rules import REQUIRED_ANALYTES, REQUIRED_FEATURES, REQUIRED_ORDER_SETS
from service.terminology.catalog import Catalog
from service.terminology.loader import MappingError, load_catalog


def check_catalog_for_rules(catalog: Catalog) -> None:
    missing_features = sorted(REQUIRED_FEATURES - catalog.features.keys())
    if missing_features:
        raise MappingError(f"features.yaml lacks features the rules use: {', '.join(missing_features)}")
    missing_analytes = sorted(REQUIRED_ANALYTES - catalog.analytes.keys())
    if missing_analytes:
        raise MappingError(f"analytes.yaml lacks analytes the rules use: {', '.join(missing_analytes)}")
    missing_orders = sorted(REQUIRED_ORDER_SETS - catalog.order_sets.keys())
    if missing_orders:
        raise MappingError(f"order_sets.yaml lacks order sets the cards use: {', '.join(missing_orders)}")


def load_rule_catalog(directory: Path | str | None = None) -> Catalog:
    """Load ``mappings/`` and check it serves the rules: the only way the service, workers and CLI get a catalog."""
    catalog = load_catalog(directory)
    check_catalog_for_rules(catalog)
    return catalog
