"""Reports: learning curves, the evaluation report, the comparison report, and the Markdown and figure helpers.

Each takes what an earlier stage produced and writes figures and Markdown to the path or folder given:

    learning_curves(result.history, ["age", "gender"], "curves.png")
    evaluate_report(net, test_df, "runs/faces")
    write_comparison(table, "runs/compare")
"""

from manyheads.reports.comparison import summarize, write_comparison
from manyheads.reports.curves import learning_curves
from manyheads.reports.evaluation import evaluate_report

__all__ = ["evaluate_report", "learning_curves", "summarize", "write_comparison"]
