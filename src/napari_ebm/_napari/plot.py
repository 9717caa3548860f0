"""A small live plot of the energy terms per step, drawn with QPainter.

It avoids a plotting dependency and redraws in well under a millisecond for a few thousand
points, so it can follow a run step by step.
"""

import math

from qtpy.QtCore import QPointF, Qt
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import QSizePolicy, QWidget

SERIES = (("total", QColor("#f0f0f0")), ("data", QColor("#4fc3f7")), ("prior", QColor("#ffb74d")))


class EnergyPlot(QWidget):
    """Plot of total, data and weighted prior energy against the step number.

    The y axis is logarithmic while every value is positive and linear otherwise.
    """

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setMinimumHeight(140)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)
        self.clear()

    def clear(self):
        self.steps = []
        self.values = {name: [] for name, _ in SERIES}
        self.update()

    def append(self, step, total, data, prior):
        """Add one step's energies; ``prior`` is the weighted prior term.

        The plot is not redrawn: call ``update()`` when it should be, at most a few times per
        second, because a redraw per step slows a fast run down.
        """
        self.steps.append(step)
        self.values["total"].append(total)
        self.values["data"].append(data)
        self.values["prior"].append(prior)

    def _transform(self, values):
        finite = [v for v in values if math.isfinite(v)]
        logarithmic = bool(finite) and min(finite) > 0
        if logarithmic:
            return [math.log10(v) if math.isfinite(v) and v > 0 else math.nan for v in values], True
        return list(values), False

    def paintEvent(self, event):  # noqa: N802 - Qt override
        painter = QPainter(self)
        painter.fillRect(self.rect(), QColor("#262930"))
        margin_left, margin_right, margin_top, margin_bottom = 68, 8, 8, 20
        width = self.width() - margin_left - margin_right
        height = self.height() - margin_top - margin_bottom
        painter.setPen(QColor("#a0a0a0"))

        if len(self.steps) < 2 or width <= 0 or height <= 0:
            painter.drawText(self.rect(), Qt.AlignmentFlag.AlignCenter, "energy per step")
            return

        series = {name: self._transform(self.values[name]) for name, _ in SERIES}
        logarithmic = all(log for _, log in series.values())
        if not logarithmic:
            series = {name: (list(self.values[name]), False) for name, _ in SERIES}
        finite = [v for values, _ in series.values() for v in values if math.isfinite(v)]
        if not finite:
            return
        low, high = min(finite), max(finite)
        if high - low < 1e-12:
            low, high = low - 1.0, high + 1.0
        first, last = self.steps[0], self.steps[-1]
        span = max(last - first, 1)

        def point(step, value):
            px = margin_left + (step - first) / span * width
            py = margin_top + (high - value) / (high - low) * height
            return QPointF(px, py)

        painter.drawLine(margin_left, margin_top, margin_left, margin_top + height)
        painter.drawLine(margin_left, margin_top + height, margin_left + width, margin_top + height)
        top_label = f"{10**high:.3g}" if logarithmic else f"{high:.3g}"
        bottom_label = f"{10**low:.3g}" if logarithmic else f"{low:.3g}"
        painter.drawText(2, margin_top + 10, top_label)
        painter.drawText(2, margin_top + height, bottom_label)
        painter.drawText(margin_left, self.height() - 4, f"step {first}")
        painter.drawText(margin_left + width - 70, self.height() - 4, f"step {last}")

        for (name, colour), legend_index in zip(SERIES, range(len(SERIES))):
            values, _ = series[name]
            polygon = QPolygonF([point(s, v) for s, v in zip(self.steps, values) if math.isfinite(v)])
            painter.setPen(QPen(colour, 1.5))
            painter.drawPolyline(polygon)
            painter.drawText(margin_left + width - 60 * (len(SERIES) - legend_index), margin_top + 12, name)
        painter.end()
