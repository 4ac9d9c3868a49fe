"""Reports: Markdown tables and plots of runs and comparisons."""

from .plots import plot_run_curves
from .run_report import results_table, write_run_report
from .tables import format_value, markdown_table, results_columns

__all__ = [
    "format_value",
    "markdown_table",
    "plot_run_curves",
    "results_columns",
    "results_table",
    "write_run_report",
]
