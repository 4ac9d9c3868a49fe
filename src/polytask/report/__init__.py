"""Reports: Markdown tables, plots and self-contained HTML pages of runs and comparisons."""

from .grid_html import write_grid_html
from .plots import plot_run_curves
from .run_html import write_run_html
from .run_report import results_table, write_run_report
from .tables import format_value, markdown_table, results_columns

__all__ = [
    "format_value",
    "markdown_table",
    "plot_run_curves",
    "results_columns",
    "results_table",
    "write_grid_html",
    "write_run_html",
    "write_run_report",
]
