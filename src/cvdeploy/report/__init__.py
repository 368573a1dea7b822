"""Reports: the bundle's report.html (variants, figures, accuracy against latency)."""

from cvdeploy.report.html import bundle_report, scatter_svg

__all__ = ["bundle_report", "scatter_svg"]
