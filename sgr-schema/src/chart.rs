//! A line chart as data: what `sgr plot --lines FILE` draws, so that tools which compile no
//! plotting library (`cargo xtask`) can still have their results drawn.

use serde::{Deserialize, Serialize};

/// A chart of named lines over a shared x axis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LineChart {
    /// Title above the chart.
    pub title: String,
    /// Label of the x axis.
    pub x_label: String,
    /// Label of the y axis.
    pub y_label: String,
    /// Place x on a log₂ scale (powers of two equally spaced, as K = 2, 4, 8, 16).
    #[serde(default)]
    pub x_log2: bool,
    /// The lines, drawn in order.
    pub series: Vec<Series>,
}

/// One line of a [`LineChart`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Series {
    /// Legend entry.
    pub label: String,
    /// `(x, y)` points, drawn in order of x.
    pub points: Vec<(f64, f64)>,
    /// Draw the line dashed (reference values beside measured ones).
    #[serde(default)]
    pub dashed: bool,
}
